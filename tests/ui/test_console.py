"""The web console (/ui) in a real headless Chromium (Debian's chromium and
chromium-driver, driven by PyPI's selenium) against a real `forkbox serve`, with API
keys on and off: sign in with a key; create a sandbox; type `echo hi` in its terminal
and see `hi`; upload a file and see it listed; fork it and see two children appear in
the list without reloading; delete them. No errors in the browser console; every
control on every page has a name (a label, an aria-label or its text) and the pages are
reachable by keyboard. Screenshots of each page go to docs/ui/ (docs/ui.md)."""
import secrets
import sys
import tempfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import forkbox_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "ui"
WAIT = 30


@pytest.fixture(scope="module", params=["auth", "open"])
def server(request):
    key = None
    extra = []
    if request.param == "auth":
        key = "fbk_" + secrets.token_hex(20)
        extra = ["--auth", "--admin-key", key]
    log = Path(tempfile.mkdtemp(prefix="forkbox-ui-")) / "server.log"
    proc, url = forkbox_server.start(log_level="info", log_file=str(log), extra=extra)
    try:
        yield url, key, request.param
    finally:
        forkbox_server.stop(proc)


@pytest.fixture
def browser():
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.set_script_timeout(WAIT)
    yield d
    d.quit()


def wait(d, cond, what):
    # (An element found just as the page redraws is stale: look again.)
    return WebDriverWait(
        d, WAIT, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
    ).until(lambda _: cond(), message=f"waiting for {what}")


def shot(d, name, mode):
    # The screenshots of docs/ui.md are the run with keys on (what an operator sees),
    # each from the top of its page.
    if mode == "auth":
        d.execute_script("window.scrollTo(0, 0)")
        SHOTS.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(SHOTS / f"{name}.png"))


UNNAMED = """
return [...document.querySelectorAll('button, input, select, textarea, a[href]')]
  .filter(e => e.offsetParent !== null && !e.classList.contains('xterm-helper-textarea'))
  .filter(e => {
    const l = e.closest('label') || (e.id && document.querySelector(`label[for="${e.id}"]`));
    return !(e.getAttribute('aria-label') || (e.textContent || '').trim() || (l && l.textContent.trim()) || e.value && e.type === 'submit');
  })
  .map(e => e.outerHTML.slice(0, 120));
"""


def named(d, page):
    bad = d.execute_script(UNNAMED)
    assert bad == [], f"{page}: controls without a name: {bad}"


def click(d, css, what):
    """Clicks what `css` finds, again if the live list redrew it in between."""
    def go():
        try:
            d.find_element(By.CSS_SELECTOR, css).click()
            return True
        except (StaleElementReferenceException, NoSuchElementException):
            return False
    wait(d, go, what)


def rows(d):
    return d.execute_script(
        "return [...document.querySelectorAll('#sandboxes tbody tr')].map(r => ({id: r.dataset.id, "
        "status: r.children[3].textContent, parent: r.children[4].textContent}))")


def test_console(server, browser, tmp_path):
    url, key, mode = server
    d = browser
    d.get(url + "/ui")
    if key:
        box = wait(d, lambda: d.find_elements(By.ID, "api-key"), "the sign-in form")[0]
        named(d, "sign in")
        shot(d, "sign-in", mode)
        box.send_keys("fbk_wrong" + "0" * 36 + Keys.ENTER)
        wait(d, lambda: "not accepted" in d.find_element(By.ID, "status").text, "the refusal")
        box.clear()
        box.send_keys(key + Keys.ENTER)
    # The list, then a sandbox created from the form (by keyboard: Enter submits).
    wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#sandboxes thead"), "the sandbox list")
    wait(d, lambda: d.find_element(By.ID, "create-template").get_attribute("value") == "python", "the templates")
    d.find_element(By.ID, "create-memory").send_keys(Keys.ENTER)
    wait(d, lambda: any(r["status"] == "running" for r in rows(d)), "the new sandbox")
    sid = next(r["id"] for r in rows(d) if r["status"] == "running")
    named(d, "sandboxes")

    # Its page: the terminal answers `echo hi`.
    click(d, f"#sandboxes a[href='#/sandbox/{sid}']", "the sandbox's link")
    term = wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea"), "the terminal")[0]
    wait(d, lambda: d.execute_script("return document.querySelector('#terminal .xterm-rows').innerText.trim().length > 0"), "a prompt")
    term.send_keys("echo hi\n")
    lines = lambda: [l.strip() for l in d.execute_script("return document.querySelector('#terminal .xterm-rows').innerText").split("\n")]  # noqa: E731
    wait(d, lambda: "hi" in lines(), "`hi` in the terminal")
    # A file uploaded into /root is listed.
    f = tmp_path / "hello-ui.txt"
    f.write_text("uploaded from the browser\n")
    d.find_element(By.ID, "upload").send_keys(str(f))
    wait(d, lambda: "hello-ui.txt" in d.find_element(By.ID, "files").text, "the uploaded file in the list")
    assert d.find_elements(By.CSS_SELECTOR, "button[aria-label='Download hello-ui.txt']")
    click(d, "button[aria-label='View hello-ui.txt']", "the view button")
    wait(d, lambda: "uploaded from the browser" in d.find_element(By.ID, "file-view").text, "the file's content")
    # A server started in the terminal shows up among the ports.
    term.send_keys("python3 -m http.server 8123 >/dev/null 2>&1 &\n")
    wait(d, lambda: "8123" in d.find_element(By.ID, "ports").text, "port 8123 in the list")
    assert d.find_elements(By.CSS_SELECTOR, "button[aria-label='Open port 8123']")
    # A cell of code, streamed.
    d.find_element(By.CSS_SELECTOR, "form[aria-label='Run code'] button[type=submit]").click()
    wait(d, lambda: "hello from forkbox" in d.find_element(By.ID, "code-output").text, "the cell's output")
    named(d, "sandbox")
    shot(d, "sandbox", mode)

    # Back to the list (no reload: the page follows the workspace's events); fork: two
    # children appear; delete all three.
    d.find_element(By.LINK_TEXT, "Sandboxes").click()
    wait(d, lambda: any(r["id"] == sid for r in rows(d)), "the list")
    marker = d.execute_script("window.__same_page = 1; return 1")
    click(d, f"button[aria-label='Fork {sid}']", "the fork button")
    wait(d, lambda: len([r for r in rows(d) if r["parent"] == sid and r["status"] == "running"]) == 2, "two children")
    assert d.execute_script("return window.__same_page") == marker, "the page was reloaded"
    shot(d, "sandboxes", mode)
    kids = [r["id"] for r in rows(d) if r["parent"] == sid]
    for k in kids + [sid]:
        click(d, f"button[aria-label='Delete {k}']", f"the delete button of {k}")
        wait(d, lambda k=k: all(r["id"] != k or r["status"] != "running" for r in rows(d)), f"{k} deleted")

    # The other pages, by keyboard from the navigation.
    for page, heading in [("Templates", "Templates"), ("Volumes", "Volumes"), ("API keys", "API keys"), ("Nodes", "Nodes")]:
        link = d.find_element(By.LINK_TEXT, page)
        link.send_keys(Keys.ENTER)
        wait(d, lambda heading=heading: d.find_element(By.TAG_NAME, "h1").text == heading, page)
        wait(d, lambda: d.find_elements(By.CSS_SELECTOR, "main table thead, main table caption"), f"the {page} table")
        named(d, page)
        if page == "API keys" and key:
            d.find_element(By.ID, "key-name").send_keys("from-the-console" + Keys.ENTER)
            wait(d, lambda: d.find_element(By.ID, "new-key").text.startswith("fbk_"), "the new key, shown once")
        shot(d, page.lower().replace(" ", "-"), mode)

    # The skip link: shown when focused, Enter moves to the content, Tab from there to
    # its first control.
    d.find_element(By.LINK_TEXT, "API keys").click()
    wait(d, lambda: d.find_element(By.TAG_NAME, "h1").text == "API keys", "the keys page")
    d.execute_script("document.querySelector('.skip').focus()")
    assert d.execute_script("return document.activeElement.getBoundingClientRect().left >= 0")
    ActionChains(d).send_keys(Keys.ENTER).perform()
    wait(d, lambda: d.switch_to.active_element.get_attribute("id") == "main", "the content focused")
    ActionChains(d).send_keys(Keys.TAB).perform()
    assert d.switch_to.active_element.get_attribute("id") == "key-name" or not key, d.switch_to.active_element.get_attribute("outerHTML")[:200]

    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    # (The refused key's 401 is the sign-in form's own doing.)
    errors = [e for e in errors if not ("/v1/auth/whoami" in e["message"] and "401" in e["message"])]
    assert errors == [], errors
