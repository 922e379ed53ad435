"""The real `pandastack` client from PyPI (0.10.0) against a real `forkbox serve`,
pointed at it only through its own settings (PANDASTACK_API, conftest.py): its
documented calls, and for each call forkbox does not offer, a clear error that
docs/compatibility.md lists."""
import base64
import os
import time
import warnings

import httpx
import pytest

import pandastack
from pandastack import (
    BadRequestError,
    Client,
    CommandFailed,
    NotFoundError,
    Sandbox,
    SandboxTimeout,
    ServerError,
    set_default_client,
)

from marks import calls  # noqa: E402

URL = os.environ["FORKBOX_TEST_URL"]




@pytest.fixture(autouse=True)
def fresh_default_client():
    set_default_client(None)
    yield
    set_default_client(None)


@pytest.fixture
def client():
    return Client(timeout=120)


@pytest.fixture
def sb(client):
    s = client.sandboxes.create()
    yield s
    try:
        s.kill()
    except (NotFoundError, BadRequestError):
        pass


def not_offered(call, hint):
    with pytest.raises(ServerError) as e:
        call()
    assert hint in str(e.value), str(e.value)


@calls("`import pandastack` is PyPI's 0.10.0")
def test_it_is_the_real_client():
    assert pandastack.__version__ == "0.10.0"
    assert "site-packages" in pandastack.__file__


@calls("`sandboxes.create(template, metadata, ttl_seconds)`, `get`, `list`, `Sandbox.list`, `kill`; unknown template 400; `cpu`/`memory_mb` the client deprecates and never sends (the raw seed 002 create sets them)")
def test_create_get_list_kill(client):
    with pytest.warns(DeprecationWarning):
        s = client.sandboxes.create(template="code-interpreter", cpu=2, memory_mb=768, metadata={"job": "t1"}, ttl_seconds=600)
    assert s.status == "running" and s.metadata == {"job": "t1"} and not s.persistent
    assert s.lifecycle()["ttl_seconds"] == 600
    got = client.sandboxes.get(s.id)
    assert (got.id, got.metadata) == (s.id, {"job": "t1"})
    assert s.id in [x.id for x in client.sandboxes.list()]
    assert s.id in [x.id for x in Sandbox.list()]
    s.kill()
    assert s.id not in [x.id for x in client.sandboxes.list()]
    with pytest.raises(NotFoundError):
        client.sandboxes.get(s.id)
    with pytest.raises(BadRequestError):
        client.sandboxes.create(template="no-such-template")


@calls("`exec` (stdout, stderr, exit code exact; `check`; `timeout_seconds`); `commands.run`")
def test_exec_exact(sb):
    r = sb.exec("printf 'a\\n\\nb'; printf 'e1\\ne2' >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == ("a\n\nb", "e1\ne2", 3)
    assert sb.commands.run("echo hi").stdout == "hi\n"
    with pytest.raises(CommandFailed) as e:
        sb.exec("echo out; exit 7", check=True)
    assert (e.value.exit_code, e.value.stdout) == (7, "out\n")
    with pytest.raises(SandboxTimeout):
        sb.exec("sleep 30", timeout_seconds=1)
    assert sb.exec("exit 124").exit_code == 124


@calls("`exec_stream` (chunks live and exact, exit code, timeout)")
def test_exec_stream(sb):
    out, err, t = [], [], []
    t0 = time.monotonic()
    code = sb.exec_stream(
        "echo one; sleep 2; echo two; echo bad >&2; exit 5",
        on_stdout=lambda c: (out.append(c), t.append(time.monotonic() - t0)),
        on_stderr=err.append,
    )
    assert code == 5
    assert ("".join(out), "".join(err)) == ("one\ntwo\n", "bad\n")
    assert t[0] < 1.5, t
    with pytest.raises(SandboxTimeout):
        sb.exec_stream("sleep 30", timeout_seconds=1)


@calls("`run_code` (python, bash)")
def test_run_code(sb):
    assert sb.run_code("print(2 + 2)").stdout == "4\n"
    assert sb.run_code("echo $((6*7)); exit 4", language="bash").exit_code == 4


@calls("`filesystem` write, read, listdir, stat, exists, walk")
def test_filesystem(sb):
    fs = sb.filesystem
    fs.write("/root/d/a.txt", "hello")
    fs.write("/root/d/sub/b.bin", b"\x00\x01")
    assert fs.read("/root/d/a.txt") == b"hello"
    entries = {e.name: e for e in fs.listdir("/root/d")}
    assert entries["sub"].is_dir and not entries["a.txt"].is_dir and entries["a.txt"].size == 5
    st = fs.stat("/root/d/sub/b.bin")
    assert (st.is_dir, st.size) == (False, 2)
    assert fs.exists("/root/d/a.txt") and not fs.exists("/root/d/nope")
    walked = {root for root, _dirs, _files in fs.walk("/root/d")}
    assert any(r.endswith("/root/d/sub") for r in walked), walked


@calls("`pause`, `resume`, `hibernate`, `wake` (idempotent)")
def test_pause_resume_hibernate_wake(client, sb):
    sb.filesystem.write("/root/kept", "x")
    sb.pause()
    assert client.sandboxes.get(sb.id).status == "paused"
    sb.resume()
    sb.hibernate()
    assert client.sandboxes.get(sb.id).status == "hibernated"
    sb.wake()
    sb.wake()
    assert sb.filesystem.read("/root/kept") == b"x"


@calls("`create(persistent=True, ttl_seconds)`: idles into hibernation, not death; `set_ttl`, `lifecycle`")
def test_persistent_and_ttl(client):
    s = client.sandboxes.create(persistent=True, ttl_seconds=2)
    assert s.persistent
    for _ in range(40):
        if client.sandboxes.get(s.id).status == "hibernated":
            break
        time.sleep(0.25)
    assert client.sandboxes.get(s.id).status == "hibernated"
    s.wake()
    assert s.set_ttl(900)["ttl_seconds"] == 900
    assert s.lifecycle() == {"ttl_seconds": 900, "persistent": True, "idle_seconds": None}
    s.kill()


@calls("`fork` (files carried, metadata inherited, `metadata` added)")
def test_fork(client):
    sb = client.sandboxes.create(metadata={"run": "a", "keep": "yes"})
    try:
        sb.filesystem.write("/root/f", "parent")
        child = sb.fork()
        assert child.id != sb.id
        assert child.filesystem.read("/root/f") == b"parent"
        assert client.sandboxes.get(child.id).metadata == {"run": "a", "keep": "yes"}
        other = sb.fork(metadata={"run": "b"})
        assert client.sandboxes.get(other.id).metadata == {"run": "b", "keep": "yes"}
        child.kill()
        other.kill()
    finally:
        sb.kill()


@calls("`fork_tree`, `promote` (siblings cleaned up), `explore` best-of-N")
def test_fork_tree_promote_and_explore(client, sb):
    sb.filesystem.write("/root/task", "base")
    kids = sb.fork_tree(3, metadata={"exp": "1"})
    assert len(kids) == 3 and len({k.id for k in kids}) == 3
    md = client.sandboxes.get(kids[0].id).metadata
    tree = md["fork_tree_id"]
    assert md["exp"] == "1" and md["fork_parent_id"] == sb.id
    for i, k in enumerate(kids):
        assert k.filesystem.read("/root/task") == b"base"
        k.filesystem.write("/root/task", f"branch {i}")
    res = kids[1].promote(cleanup_siblings=True)
    assert res["winner"] == kids[1].id and res["tree_id"] == tree
    assert sorted(res["deleted"]) == sorted([kids[0].id, kids[2].id]) and res["failures"] == []
    for gone in (kids[0], kids[2]):
        with pytest.raises(NotFoundError):
            client.sandboxes.get(gone.id)
    assert kids[1].filesystem.read("/root/task") == b"branch 1"
    again = kids[1].promote(cleanup_siblings=True)  # idempotent
    assert again["deleted"] == []
    kids[1].kill()
    with pytest.raises(BadRequestError):
        sb.promote(cleanup_siblings=True)  # not a tree member, no tree_id
    with pytest.raises(BadRequestError):
        sb.fork_tree(33)
    # The client's best-of-N over a fork tree: the branch that passes wins, the rest go.
    result = sb.explore(["exit 1", "grep -q base /root/task && echo PASS", "exit 2"])
    assert result.errors == [] and result.reap_failures == {}, result
    assert result.winner is not None and result.winner_outcome.ok
    assert "PASS" in result.winner_outcome.stdout_tail
    assert len(result.reaped) == 2
    left = [s.id for s in client.sandboxes.list() if (s.metadata or {}).get("fork_tree_id") == result.tree_id]
    assert left == [result.winner.id]
    result.winner.kill()


@calls("`snapshot`, `snapshots.list(sandbox_id)`, `get`, `delete`; `create(from_snapshot)`")
def test_snapshots(client, sb):
    sb.filesystem.write("/root/snap.txt", "v1")
    sid = sb.snapshot()
    assert sid.startswith("snap-")
    listed = client.snapshots.list(sandbox_id=sb.id)
    assert [x["id"] for x in listed] == [sid]
    assert client.snapshots.get(sid)["sandbox_id"] == sb.id
    again = client.sandboxes.create(from_snapshot=sid)
    assert again.filesystem.read("/root/snap.txt") == b"v1"
    again.kill()
    client.snapshots.delete(sid)
    with pytest.raises(NotFoundError):
        client.snapshots.get(sid)


@calls("`templates.list`, `templates.get` (`code-interpreter`)")
def test_templates(client):
    names = [t.name for t in client.templates.list()]
    assert "code-interpreter" in names and "python" in names
    assert client.templates.get("code-interpreter").name == "code-interpreter"
    with pytest.raises(NotFoundError):
        client.templates.get("no-such-template")


@calls("`volumes` create, list, get, delete by name; `create(volumes=[{name}])` mounts it at `/mnt/<name>`, `read_only` too")
def test_volumes_by_name(client):
    name = f"data-{os.getpid()}"
    client.volumes.create(name, 64)
    with pytest.raises(BadRequestError):
        client.volumes.create(name, 64)
    assert name in [v["name"] for v in client.volumes.list()]
    assert client.volumes.get(name)["size_mb"] == 64
    s = client.sandboxes.create(volumes=[{"name": name}])
    s.filesystem.write(f"/mnt/{name}/x", "on the volume")
    s.kill()
    t = client.sandboxes.create(volumes=[{"name": name}])
    assert t.filesystem.read(f"/mnt/{name}/x") == b"on the volume"
    # Read-only beside a writer: reads what it writes, writes nothing itself.
    ro = client.sandboxes.create(volumes=[{"name": name, "read_only": True}])
    assert ro.filesystem.read(f"/mnt/{name}/x") == b"on the volume"
    r = ro.exec(f"echo no > /mnt/{name}/y")
    assert r.exit_code != 0 and "Read-only file system" in r.stderr, r
    with pytest.raises(BadRequestError):  # 403: a read-only file system
        ro.filesystem.write(f"/mnt/{name}/y", "no")
    t.filesystem.write(f"/mnt/{name}/z", "later")
    assert ro.filesystem.read(f"/mnt/{name}/z") == b"later"
    assert not t.filesystem.exists(f"/mnt/{name}/y")
    ro.kill()
    t.kill()
    client.volumes.delete(name)
    with pytest.raises(NotFoundError):
        client.volumes.get(name)


@calls("`me`, `tokens.create` (also `expires_in_days`), `tokens.list`, `tokens.revoke`")
def test_me_and_tokens(client):
    me = client.me()
    assert me["current_org"]["slug"] == "default"
    tok = client.tokens.create(f"ci-{os.getpid()}")
    assert tok.token.startswith("fbk_")
    assert tok.prefix in [t.prefix for t in client.tokens.list()]
    # The new key works (as forkbox's own key).
    assert httpx.get(URL + "/v1/auth/whoami", headers={"authorization": f"Bearer {tok.token}"}).status_code == 200
    client.tokens.revoke(tok.prefix)
    assert tok.prefix not in [t.prefix for t in client.tokens.list()]
    # An expiring key: in force now, its expiry a day on.
    exp = client.tokens.create(f"ci-exp-{os.getpid()}", expires_in_days=1)
    assert httpx.get(URL + "/v1/auth/whoami", headers={"authorization": f"Bearer {exp.token}"}).status_code == 200
    mine = [t for t in httpx.get(URL + "/v1/auth/tokens").json()["tokens"] if t["prefix"] == exp.prefix]
    from datetime import datetime, timezone
    left = datetime.fromisoformat(mine[0]["expires_at"].replace("Z", "+00:00")) - datetime.now(timezone.utc)
    assert 86000 < left.total_seconds() <= 86400, left
    client.tokens.revoke(exp.prefix)


@calls("`logs`")
def test_logs(sb):
    sb.exec("true")
    lines = list(sb.logs())
    assert all(isinstance(l, str) for l in lines)


@calls("`create_code_context` (python, javascript), `CodeContext.run_code` (state per context, last-expression and rich results, stdout, errors, timeout), `close`")
def test_code_contexts(sb):
    a = sb.create_code_context()
    b = sb.create_code_context("python")
    assert a.id != b.id and a.language == "python"
    assert a.run_code("x = 41").results == []
    ex = a.run_code("print('hi')\nx + 1")
    assert (ex.text, ex.stdout, ex.error, ex.exit_code) == ("42", "hi\n", None, 0)
    ex = b.run_code("x")
    assert ex.exit_code == 1 and "NameError" in ex.error and "forkbox" not in ex.error
    ex = a.run_code("class H:\n    def _repr_html_(self):\n        return '<b>h</b>'\nH()")
    assert ex.results[0].html == "<b>h</b>" and ex.results[0].text.startswith("<__main__.H object")
    ex = a.run_code("import sys\nprint('err', file=sys.stderr)")
    assert ex.stderr == "err\n" and ex.stdout == ""
    with pytest.raises(SandboxTimeout):
        a.run_code("import time\ntime.sleep(30)", timeout_seconds=1)
    assert a.run_code("x").text == "41"  # an interrupted cell keeps the context
    a.close()
    with pytest.raises(NotFoundError):
        a.run_code("x")
    assert b.run_code("1 + 1").text == "2"
    b.close()
    not_offered(lambda: sb.create_code_context("bash"), "python or javascript")
    js = sb.create_code_context("javascript")
    assert js.language == "javascript"
    assert js.run_code("const n = 6; n * 7").text == "42"
    js.close()


@calls("the `code-interpreter` template's data stack in a code context: a pandas DataFrame as HTML, a matplotlib figure as PNG")
def test_data_stack(sb):
    ctx = sb.create_code_context()
    ex = ctx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    assert ex.error is None and "<table" in ex.results[0].html, ex
    ex = ctx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert ex.error is None and len(ex.results) == 1, ex
    assert base64.b64decode(ex.png)[:8] == b"\x89PNG\r\n\x1a\n"
    ctx.close()


@calls("`preview_urls` / `preview_url` (with `preview_host` set to the server): the app answers at its URL, by host")
def test_preview_urls(client, sb):
    from urllib.parse import urlparse

    sb.exec("mkdir -p /srv && echo preview-ok > /srv/index.html")
    sb.exec("cd /srv && nohup python3 -m http.server 8000 >/dev/null 2>&1 &")
    server = urlparse(URL).netloc  # 127.0.0.1:port
    client.preview_host = "localhost:" + server.split(":")[1]
    deadline = time.time() + 30
    urls = {}
    while 8000 not in urls:
        assert time.time() < deadline, urls
        urls = sb.preview_urls()
        time.sleep(0.1)
    url = urlparse(urls[8000])
    assert url.netloc == f"8000-{sb.id}.localhost:{server.split(':')[1]}"
    assert urls[8000] == sb.preview_url(8000)
    # *.localhost is loopback for browsers; here the request goes to 127.0.0.1 naming
    # the preview host.
    r = httpx.get(f"http://{server}/index.html", headers={"host": url.netloc})
    assert r.status_code == 200 and r.text == "preview-ok\n"


def sse_events(resp, want):
    """(event, data) pairs of an SSE response until `want` of them were read."""
    got, ev = [], None
    for line in resp.iter_lines():
        if line.startswith("event:"):
            ev = line[6:].strip()
        elif line.startswith("data:"):
            got.append((ev, line[5:].strip()))
            ev = None
            if len(got) >= want:
                break
    return got


@calls('raw seed 002 requests: create with `{template, cpu, memory_mb, metadata, volumes: [{id, mount}], egress_allowlist}` → 201 `{id, status, template, created_at, boot_ms}`; list `?template=&status=`; pause/resume/hibernate/wake/fork/`snapshot`; `logs` and `events` SSE; `exec`, `exec/stream`, `WS exec/pty`; `/files`, `/files/ls`; templates; volumes by id; `/auth/whoami`, `/auth/tokens`; `?access_token=`; `WS /lsp/{lang}` (python, typescript, go; rust with your own template)')
def test_raw_seed_002_requests():
    import json
    from websockets.sync.client import connect

    h = {"Authorization": "Bearer pds_not_a_forkbox_key"}
    with httpx.Client(base_url=URL + "/pandastack/v1", headers=h, timeout=120) as c:
        vol = c.post("/volumes", json={"name": "seed002", "size_mb": 64})
        assert vol.status_code == 201, vol.text
        vid = vol.json()["id"]
        assert c.get(f"/volumes/{vid}").json()["name"] == "seed002"
        assert any(v["id"] == vid for v in c.get("/volumes").json()["items"])
        body = {
            "template": "code-interpreter",
            "cpu": 2,
            "memory_mb": 768,
            "metadata": {"user_id": "u_123"},
            "volumes": [{"id": vid, "mount": "/mnt/data"}],
            "egress_allowlist": ["api.openai.com", "pypi.org"],
        }
        r = c.post("/sandboxes", json=body)
        assert r.status_code == 201, r.text
        sb = r.json()
        sid = sb["id"]
        assert sb["status"] == "running" and sb["template"] == "code-interpreter"
        assert sb["created_at"].endswith("Z") or "+" in sb["created_at"]
        assert isinstance(sb["boot_ms"], (int, float)) and sb["metadata"] == {"user_id": "u_123"}
        assert sb["egress_allowlist"] == ["api.openai.com", "pypi.org"]
        own = httpx.get(f"{URL}/v1/sandboxes/{sb['id']}").json()
        assert (own["cpu"], own["memory_mb"]) == (2, 768), own
        try:
            ids = lambda q: [s["id"] for s in c.get("/sandboxes", params=q).json()["items"]]
            assert sid in ids({"template": "code-interpreter", "status": "running"})
            assert sid not in ids({"template": "python"}) and sid not in ids({"status": "paused"})
            assert c.get(f"/sandboxes/{sid}").json()["id"] == sid

            # Files at /files, on the mounted volume.
            assert c.put(f"/sandboxes/{sid}/files", params={"path": "/mnt/data/a.txt"}, content=b"seed\n").status_code in (200, 201, 204)
            assert c.get(f"/sandboxes/{sid}/files", params={"path": "/mnt/data/a.txt"}).content == b"seed\n"
            ls = c.get(f"/sandboxes/{sid}/files/ls", params={"path": "/mnt/data"}).json()
            assert [e["name"] for e in ls["entries"]] == ["a.txt"]
            r = c.post(f"/sandboxes/{sid}/exec", json={"cmd": "cat /mnt/data/a.txt; echo $HTTPS_PROXY | cut -c1-4; exit 3"})
            assert r.json()["stdout"] == "seed\nhttp\n" and r.json()["exit_code"] == 3
            assert c.delete(f"/sandboxes/{sid}/files", params={"path": "/mnt/data/a.txt"}).status_code in (200, 204)

            # The key as ?access_token= (SSE, where headers cannot be set).
            with httpx.stream("POST", f"{URL}/pandastack/v1/sandboxes/{sid}/exec/stream?access_token=pds_x",
                              json={"cmd": "echo one; echo two >&2"}, timeout=60) as s:
                got = sse_events(s, 3)
            kinds = [k for k, _ in got]
            assert kinds[-1] == "exit" and json.loads(got[-1][1])["exit_code"] == 0
            assert "".join(json.loads(d)["chunk"] for k, d in got if k == "stdout") == "one\n"

            # The terminal WebSocket.
            ws_url = URL.replace("http", "ws", 1) + f"/pandastack/v1/sandboxes/{sid}/exec/pty?rows=30&cols=100&access_token=pds_x"
            with connect(ws_url, open_timeout=30) as ws:
                ws.send(b"stty size; exit 5\r")
                out, code = b"", None
                while code is None:
                    m = ws.recv(timeout=30)
                    if isinstance(m, bytes):
                        out += m
                    else:
                        code = json.loads(m)["code"]
            assert b"30 100" in out and code == 5

            # Lifecycle, and its events and logs as SSE.
            for verb, status in [("pause", "paused"), ("resume", "running"), ("hibernate", "hibernated"), ("wake", "running")]:
                r = c.post(f"/sandboxes/{sid}/{verb}")
                assert r.status_code == 200, (verb, r.text)
                assert c.get(f"/sandboxes/{sid}").json()["status"] == status
            with c.stream("GET", f"/sandboxes/{sid}/events", params={"follow": 1, "tail": 200}) as s:
                evs = [k for k, _ in sse_events(s, 5)]
            assert evs[:1] == ["created"] and "paused" in evs, evs
            with c.stream("GET", f"/sandboxes/{sid}/logs", params={"follow": 1}) as s:
                assert sse_events(s, 1)
            r = c.post(f"/sandboxes/{sid}/snapshot", json={"name": "seed-002"})
            assert r.status_code == 201 and r.json()["name"] == "seed-002"
            r = c.post(f"/sandboxes/{sid}/fork")
            assert r.status_code in (200, 201), r.text
            child_id = r.json()["sandbox"]["id"]
            assert c.delete(f"/sandboxes/{child_id}").status_code == 204

            # Templates, identity, tokens.
            names = [t["name"] for t in c.get("/templates").json()]
            assert "code-interpreter" in names and "python" in names
            assert c.get("/templates/code-interpreter").json()["name"] == "code-interpreter"
            r = c.post("/templates", json={"nonsense": 1})
            assert r.status_code == 400 and "error" in r.json()
            assert c.delete("/templates/no-such-template").status_code == 404
            me = c.get("/auth/whoami").json()
            assert me["workspace"]
            tok = c.post("/auth/tokens", json={"name": "seed-002"})
            assert tok.status_code == 201, tok.text
            tid = tok.json()["id"]
            assert any(t["id"] == tid for t in c.get("/auth/tokens").json()["items"])
            assert c.delete(f"/auth/tokens/{tid}").status_code == 204
            assert not any(t["id"] == tid for t in c.get("/auth/tokens").json()["items"])

            # The LSP bridge is a WebSocket (tests/lsp drives it with an LSP client); a
            # plain GET is a clear 400, and this template has no language server.
            r = c.get(f"/sandboxes/{sid}/lsp/python")
            assert r.status_code == 400 and "WebSocket" in r.json()["error"], r.text
            r = c.get(
                f"/sandboxes/{sid}/lsp/python",
                headers={"connection": "upgrade", "upgrade": "websocket",
                         "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="},
            )
            assert r.status_code == 400 and 'template "lsp"' in r.json()["error"], r.text
            assert httpx.get(URL + "/openapi.json").json()["openapi"].startswith("3")
        finally:
            assert c.delete(f"/sandboxes/{sid}").status_code == 204
        assert c.delete(f"/volumes/{vid}").status_code == 204
