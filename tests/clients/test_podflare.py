"""The real `podflare` client from PyPI (0.0.22) against a real `forkbox serve`, pointed
at it only through the client's own settings (conftest.py): its documented surface,
call by call. Where forkbox does not offer a call, the answer is a clear JSON error
that docs/compatibility.md lists."""
import base64
import os
import time

import httpx
import pytest

import podflare
from podflare import Client, Sandbox

from marks import calls  # noqa: E402

URL = os.environ["FORKBOX_TEST_URL"]




def forkbox(path):
    """A sandbox as forkbox's own API shows it."""
    return httpx.get(URL + path).json()


def ended(sid):
    """An ended sandbox's record (forkbox's list of every sandbox)."""
    rows = httpx.get(URL + "/v1/sandboxes?status=all").json()["sandboxes"]
    return next(r for r in rows if r["id"] == sid)


def status_of(call):
    with pytest.raises(httpx.HTTPStatusError) as e:
        call()
    return e.value.response.status_code


@calls("`import podflare` is PyPI's 0.0.22")
def test_it_is_the_real_client():
    assert podflare.__version__ == "0.0.22"
    assert hasattr(podflare, "close_default_client")
    assert "site-packages" in podflare.__file__


@calls('`Client().healthz()`')
def test_healthz():
    assert Client().healthz() is True


@calls('`with Sandbox()`, `run_code` (state kept; `stdout`/`stderr` exactly what was printed; exit codes of exceptions, `sys.exit`, bash)')
def test_run_code_keeps_state_and_reports_exactly_what_was_printed():
    with Sandbox() as s:
        r = s.run_code("x = 41\nfor i in range(3): print(i)")
        assert (r.stdout, r.stderr, r.exit_code) == ("0\n1\n2\n", "", 0)
        r = s.run_code("print(x + 1)\nprint()\nprint('a\\tb', end='')")
        assert (r.stdout, r.exit_code) == ("42\n\na\tb", 0)
        r = s.run_code("import sys\nprint('oops', file=sys.stderr)\nprint('two\\nlines', file=sys.stderr)")
        assert (r.stdout, r.stderr, r.exit_code) == ("", "oops\ntwo\nlines\n", 0)
        r = s.run_code("raise ValueError('bad')")
        assert r.exit_code == 1 and r.stderr.rstrip().endswith("ValueError: bad")
        assert s.run_code("import sys; sys.exit(3)").exit_code == 3
        r = s.run_code("echo $((6 * 7)); exit 4", language="bash")
        assert (r.stdout, r.exit_code) == ("42\n", 4)


@calls('`run_code_stream` (live, `type`/`data`/`seq`/`ts`)')
def test_run_code_stream_is_live_and_ordered():
    with Sandbox() as s:
        t0 = time.monotonic()
        first = None
        events = []
        for ev in s.run_code_stream("import time\nprint('a', flush=True)\ntime.sleep(2)\nprint('b')"):
            if first is None:
                first = time.monotonic() - t0
            events.append(ev)
        assert first < 1.5, f"the first line came after {first:.1f}s"
        assert [e.type for e in events][-1] == "exit"
        assert [e.data for e in events if e.type == "stdout"] == ["a", "b", ""]
        assert all(isinstance(e.ts, int) for e in events)
        seqs = [e.seq for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@calls('`fork(n)`, `merge_into(winner)` (REPL memory and files carried; the winner consumed)')
def test_fork_and_merge_into_carry_state():
    with Sandbox() as s:
        s.run_code("data = list(range(100000)); tag = 'parent'")
        s.upload(b"parent", "/root/f.txt")
        kids = s.fork(n=2)
        assert len(kids) == 2
        assert kids[0].run_code("print(len(data), tag)").stdout == "100000 parent\n"
        kids[1].run_code("tag = 'winner'")
        kids[1].upload(b"winner", "/root/f.txt")
        s.merge_into(kids[1])
        assert s.run_code("print(tag, len(data))").stdout == "winner 100000\n"
        assert s.download("/root/f.txt") == b"winner"
        # The winner's id is consumed; its sibling lives on.
        assert status_of(lambda: kids[1].run_code("1")) == 410
        kids[1].close()  # a no-op for a merged winner
        assert kids[0].run_code("print(tag)").stdout == "parent\n"
        kids[0].close()


@calls('`upload`, `download`')
def test_upload_and_download_round_trip_binary():
    blob = os.urandom(100_000)
    with Sandbox() as s:
        s.upload(blob, "/root/data/blob.bin")
        assert s.download("/root/data/blob.bin") == blob
        with pytest.raises(IOError):
            s.download("/root/missing")


@calls('`replay()`: the recent exec events, as streamed (types, data, seq), across calls')
def test_replay():
    with Sandbox() as s:
        assert s.replay() == []
        s.run_code("print('a')\nprint('b')")
        s.run_code("import sys; print('oops', file=sys.stderr)")
        events = s.replay()
        assert [(e.type, e.data) for e in events if e.type != "exit"] == [
            ("stdout", "a"), ("stdout", "b"), ("stdout", ""), ("stderr", "oops"), ("stderr", ""),
        ], events
        assert [e.type for e in events].count("exit") == 2
        # Each call's events as they were numbered in its stream.
        assert all(e.seq >= 1 for e in events)
        other = s.fork(n=1)[0]
        assert other.replay() == []
        other.close()


@calls('errors: `fork(33)` 400, unknown id 404, ended 410')
def test_errors():
    with Sandbox() as s:
        assert status_of(lambda: s.fork(n=33)) == 400
        ghost = Sandbox._from_id("sbx-0000000000000000", s._client)
        assert status_of(lambda: ghost.run_code("1")) == 404
        gone = s.fork(n=1)[0]
        gone.close()
        assert status_of(lambda: gone.run_code("1")) == 410
        assert status_of(lambda: gone.close()) == 410


class Collect:
    """A PTY's output as it arrives (the client calls on_data from its reader thread)."""

    def __init__(self):
        self.data = b""

    def __call__(self, b):
        self.data += b

    def wait_for(self, needle, timeout=30):
        deadline = time.time() + timeout
        while needle not in self.data:
            assert time.time() < deadline, (needle, self.data)
            time.sleep(0.02)


@calls('`pty.create` (`cmd` as a shell line or an argv list, `env`, `cwd`), `send_input`, `resize`, `wait` (exit code), `kill`, `list`')
def test_pty_sessions():
    with Sandbox() as s:
        out = Collect()
        codes = []
        p = s.pty.create(
            cmd='echo "[$FOO]"; pwd; read x; echo "got $x"; read y; stty size; exit 3',
            env={"FOO": "bar baz"},
            cwd="/tmp",
            on_data=out,
            on_exit=codes.append,
        )
        assert p.id.startswith("pty-")
        out.wait_for(b"[bar baz]\r\n/tmp\r\n")
        p.send_input("abc\r")
        out.wait_for(b"got abc")
        p.resize(cols=200, rows=50)
        p.send_input(b"\r")
        out.wait_for(b"50 200")
        assert p.wait(timeout=30) == 3
        assert codes == [3]

        # argv runs the program itself, no shell interpreting its words.
        out2 = Collect()
        q = s.pty.create(cmd=["printf", "%s|", "it's $HOME", "*"], on_data=out2)
        assert q.wait(timeout=30) == 0
        assert out2.data == b"it's $HOME|*|"

        # kill ends the process tree; the exit still arrives.
        r = s.pty.create(cmd="sleep 600 & sleep 600")
        r.kill()
        assert r.wait(timeout=30) != 0
        r.kill()  # an ended session: nothing to do

        listed = {i.pty_id: i for i in s.pty.list()}
        assert set(listed) == {p.id, q.id, r.id}
        assert listed[p.id].cmd_label.startswith("echo") and listed[p.id].exit_code == 3
        assert listed[q.id].cmd_label == "printf %s| it's $HOME *"
        assert listed[q.id].created_at_ms > 1_700_000_000_000
        # The sleeps are gone with it.
        ps = s.run_code("ps -eo comm", language="bash").stdout
        assert "sleep" not in ps, ps


@calls('`pty.attach` (kept output replayed, then live), the long-poll `read`; another sandbox\'s session 404')
def test_pty_attach_and_read():
    with Sandbox() as s, Sandbox() as other:
        first = Collect()
        p = s.pty.create(
            cmd="for i in 1 2 3; do echo line$i; done; read x; echo end$x; read y",
            on_data=first,
        )
        first.wait_for(b"line3")
        p.close()  # this handle stops listening; the session lives on
        again = Collect()
        a = s.pty.attach(p.id, on_data=again)
        again.wait_for(b"line1\r\nline2\r\nline3")
        a.send_input("X\r")
        again.wait_for(b"endX")
        # The long-poll reader: from an offset, waiting for what comes next.
        c = s._client
        got = c.pty_read(s.id, p.id, since_seq=0, timeout_ms=1000)
        data = base64.b64decode(got["data_b64"])
        assert got["seq"] == 0 and data.startswith(b"line1") and b"endX" in data
        assert got["next_seq"] == len(data) and not got["exited"]
        t = time.time()
        idle = c.pty_read(s.id, p.id, since_seq=got["next_seq"], timeout_ms=500)
        assert idle["data_b64"] == "" and time.time() - t >= 0.4
        a.send_input("\r")
        assert a.wait(timeout=30) == 0
        done = c.pty_read(s.id, p.id, since_seq=got["next_seq"], timeout_ms=5000)
        while not done["exited"]:
            done = c.pty_read(s.id, p.id, since_seq=done["next_seq"], timeout_ms=5000)
        assert done["exit_code"] == 0
        # Sessions belong to their sandbox: another sandbox's calls do not find them.
        assert status_of(lambda: c.pty_input(other.id, p.id, b"x")) == 404
        assert status_of(lambda: c.pty_read(other.id, p.id, since_seq=0)) == 404
        assert other.pty.list() == []
        with pytest.raises(httpx.HTTPStatusError) as e:
            c.pty_input(s.id, p.id, b"late")
        assert e.value.response.status_code == 409


@calls('`Sandbox(timeout_seconds, ram_mib, rootfs_gb, egress=False)`; `egress=True` 400')
def test_create_fields_have_their_meaning():
    with Sandbox(timeout_seconds=600, ram_mib=256, rootfs_gb=1, egress=False) as s:
        v = forkbox(f"/v1/sandboxes/{s.id}")
        assert (v["timeout"], v["memory_mb"], v["disk_mb"]) == (600, 256, 1024)
        assert v["egress_allowlist"] is None
        assert s.run_code("print(1)").stdout == "1\n"
    with pytest.raises(httpx.HTTPStatusError) as e:
        Sandbox(egress=True)
    assert e.value.response.status_code == 400
    assert "egress" in e.value.response.json()["error"]


@calls('`Sandbox(idle_timeout_seconds)` (a running cell is not idleness)')
def test_idle_timeout_ends_an_unused_sandbox_and_a_busy_one_lives():
    s = Sandbox(idle_timeout_seconds=2)
    busy = Sandbox(idle_timeout_seconds=2)
    # A cell running longer than the idle timeout is not idleness.
    assert busy.run_code("import time; time.sleep(4); print('done')").stdout == "done\n"
    assert forkbox(f"/v1/sandboxes/{busy.id}")["status"] == "running"
    busy.close()
    # The other one was not used meanwhile (status reads do not count as use).
    v = ended(s.id)
    assert (v["status"], v["end_reason"]) == ("killed", "idle timeout"), v
    assert status_of(lambda: s.run_code("1")) == 410


@calls('`Sandbox(persistent=True)` idles into a space; `Sandbox.resume(space_id)`')
def test_a_persistent_sandbox_idles_into_a_space_and_resumes():
    s = Sandbox(idle_timeout_seconds=2, persistent=True)
    s.upload(b"kept", "/root/kept.txt")
    for _ in range(40):
        if forkbox(f"/v1/sandboxes/{s.id}")["status"] == "hibernated":
            break
        time.sleep(0.25)
    assert forkbox(f"/v1/sandboxes/{s.id}")["status"] == "hibernated"
    back = Sandbox.resume(s.id)
    assert back.id == s.id
    assert back.download("/root/kept.txt") == b"kept"
    back.close()


@calls('`traceparent` by argument, `Client(traceparent)`, `PODFLARE_TRACEPARENT`')
def test_traceparent_by_argument_client_and_env():
    log = os.environ["FORKBOX_TEST_LOG"]
    ids = {
        "arg": "4bf92f3564d486ad4bf92f3564d486a1",
        "client": "4bf92f3564d486ad4bf92f3564d486a2",
        "env": "4bf92f3564d486ad4bf92f3564d486a3",
    }
    tp = lambda t: f"00-{t}-00f067aa0ba902b7-01"  # noqa: E731
    with Sandbox(traceparent=tp(ids["arg"])) as s:
        s.run_code("print(1)")
    c = Client(traceparent=tp(ids["client"]))
    with Sandbox(client=c) as s:
        s.run_code("print(2)")
    c.close()
    os.environ["PODFLARE_TRACEPARENT"] = tp(ids["env"])
    try:
        podflare.close_default_client()
        with Sandbox() as s:
            s.run_code("print(3)")
    finally:
        del os.environ["PODFLARE_TRACEPARENT"]
        podflare.close_default_client()
    text = open(log).read()
    for how, t in ids.items():
        assert t in text, f"trace id by {how} not in the server log"


@calls('raw seed 000 requests: `{}` create with a Bearer key, NDJSON `exec` events (`type`, one line of `data`, `seq`, `ts`; `exit` with an int), `fork` n > 32 400, `merge_into` (winner\'s state committed as the parent\'s), `DELETE`, `{"error"}` bodies, `healthz`')
def test_raw_seed_000_requests():
    base = URL + "/podflare"
    h = {"Authorization": "Bearer pk_your_key_here", "content-type": "application/json"}
    with httpx.Client(base_url=base, headers=h, timeout=60) as c:
        assert c.get("/v1/healthz").text.strip() == "ok"
        r = c.post("/v1/sandboxes", content="{}")
        assert r.status_code in (200, 201), r.text
        sid = r.json()["id"]
        t0 = int(time.time() * 1000)
        code = "x = 41\nfor i in range(3): print(i)\nimport sys; print('oops', file=sys.stderr)"
        with c.stream("POST", f"/v1/sandboxes/{sid}/exec", json={"code": code}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            events = [__import__("json").loads(line) for line in r.iter_lines() if line]
        for e in events:
            assert set(e) == {"type", "data", "seq", "ts"}, e
            assert t0 - 1000 <= e["ts"] <= time.time() * 1000 + 1000
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        out = [e["data"] for e in events if e["type"] == "stdout"]
        err = [e["data"] for e in events if e["type"] == "stderr"]
        assert "\n".join(out) == "0\n1\n2\n" and all("\n" not in d for d in out)
        assert "\n".join(err) == "oops\n"
        assert events[-1]["type"] == "exit" and events[-1]["data"] == 0
        # Errors: one human-readable `error` string.
        r = c.post(f"/v1/sandboxes/{sid}/fork", json={"n": 33})
        assert r.status_code == 400 and isinstance(r.json()["error"], str)
        r = c.post("/v1/sandboxes/sbx-0000000000000000/exec", json={"code": "1"})
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        # Fork, change one child, commit it as the parent's state.
        kids = c.post(f"/v1/sandboxes/{sid}/fork", json={"n": 2}).json()["children"]
        assert len(kids) == 2
        with c.stream("POST", f"/v1/sandboxes/{kids[1]}/exec", json={"code": "x += 1"}) as r:
            list(r.iter_lines())
        r = c.post(f"/v1/sandboxes/{sid}/merge_into/{kids[1]}")
        assert r.status_code in (200, 204), r.text
        with c.stream("POST", f"/v1/sandboxes/{sid}/exec", json={"code": "print(x)"}) as r:
            got = [__import__("json").loads(line) for line in r.iter_lines() if line]
        assert [e["data"] for e in got if e["type"] == "stdout"][0] == "42"
        for k in (kids[0], sid):
            assert c.delete(f"/v1/sandboxes/{k}").status_code in (200, 204)
