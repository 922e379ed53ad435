"""A real `forkbox serve` for the real third-party clients' suites.

The clients read their settings when they are imported, so the server is started and
the clients' own settings (only those) are pointed at it before any test module is
imported: `pytest_configure`."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import forkbox_server  # noqa: E402

_server = {}


def pytest_configure(config):
    log = Path(tempfile.mkdtemp(prefix="forkbox-clients-")) / "server.log"
    proc, url = forkbox_server.start(log_level="info", log_file=str(log))
    _server.update(proc=proc, url=url, log=log)
    os.environ["FORKBOX_TEST_URL"] = url
    os.environ["FORKBOX_TEST_LOG"] = str(log)
    # podflare: its base URL (Sandbox() reads PODFLARE_API_URL, Client() and clients
    # built for a traceparent or key read PODFLARE_HOSTD_URL), and the key its users
    # have exported for the hosted service, which a local forkbox without --auth
    # must not refuse.
    os.environ["PODFLARE_API_URL"] = url + "/podflare"
    os.environ["PODFLARE_HOSTD_URL"] = url + "/podflare"
    os.environ["PODFLARE_API_KEY"] = "pf_live_not_a_forkbox_key"
    # pandastack: its base URL and the hosted key it refuses to run without; a HOME of
    # its own so no ~/.config/pandastack/config.json is read; no hidden create retries.
    os.environ["PANDASTACK_API"] = url + "/pandastack"
    os.environ["PANDASTACK_API_KEY"] = "pds_not_a_forkbox_key"
    os.environ["PANDASTACK_MAX_CREATE_RETRY_SECONDS"] = "0"
    os.environ["HOME"] = str(log.parent / "home")
    # declaw: its one setting is a host:port (no path; the dialect is served at the
    # root), and a hosted key, which a local forkbox without --auth must not refuse.
    os.environ["DECLAW_DOMAIN"] = url.split("://", 1)[1]
    os.environ["DECLAW_API_KEY"] = "dk_not_a_forkbox_key"
    # No region pin from an earlier run may redirect Sandbox().
    os.environ["XDG_CACHE_HOME"] = str(log.parent / "cache")


def pytest_unconfigure(config):
    if "proc" in _server:
        forkbox_server.stop(_server["proc"])
        shutil.rmtree(_server["log"].parent, ignore_errors=True)


# --- docs/compatibility.md: each client's section is rewritten from the last run ----

_results = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _results[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    """Writes the calls each test covers (its docstring's first line, or its name) and
    the outcome into the client's section of docs/compatibility.md."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
    if not doc.exists() or not _results:
        return
    by_client = {}
    for item in session.items:
        client = Path(item.fspath).stem.removeprefix("test_")
        calls = getattr(item.function, "calls", item.name.removeprefix("test_").replace("_", " "))
        outcome = _results.get(item.nodeid, "not run")
        by_client.setdefault(client, []).append((calls, outcome))
    text = doc.read_text()
    for client, rows in by_client.items():
        start, end = f"<!-- {client}:start -->", f"<!-- {client}:end -->"
        if start not in text or end not in text:
            continue
        passed = sum(1 for _, o in rows if o == "passed")
        table = [
            start,
            f"Last run: {passed} of {len(rows)} passed (`make test`, tests/clients/test_{client}.py).",
            "",
            "| calls | result |",
            "|---|---|",
        ]
        table += [f"| {calls} | {'works' if o == 'passed' else o.upper()} |" for calls, o in rows]
        table.append(end)
        head, rest = text.split(start, 1)
        text = head + "\n".join(table) + rest.split(end, 1)[1]
    doc.write_text(text)
