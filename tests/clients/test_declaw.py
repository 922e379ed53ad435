"""The real `declaw` client from PyPI (1.7.0) against a real `forkbox serve`, pointed at
it only by the client's own setting (`DECLAW_DOMAIN=host:port`, conftest.py): its
documented calls, and for each call forkbox does not offer, a clear error that
docs/compatibility.md lists. Raw seed 004 requests (X-API-Key, HTTP/2, `message`
errors) too."""
import importlib.metadata
import os
import time

import httpx
import pytest

import declaw
from declaw import Sandbox
from declaw.exceptions import (
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)

from marks import calls  # noqa: E402

URL = os.environ["FORKBOX_TEST_URL"]


@pytest.fixture
def sbx():
    s = Sandbox.create(timeout=600)
    yield s
    try:
        s.kill()
    except NotFoundException:
        pass


def not_offered(call, words):
    with pytest.raises(SandboxException) as e:
        call()
    assert "501" in str(e.value) and words in str(e.value), str(e.value)


@calls("`import declaw` is PyPI's 1.7.0")
def test_the_real_client():
    assert importlib.metadata.version("declaw") == "1.7.0"
    assert "site-packages" in declaw.__file__


@calls("`Sandbox.create(template, timeout, metadata, envs)`, `get_info`, `is_running`, `set_timeout`, `list`, `kill`, `connect`")
def test_lifecycle():
    s = Sandbox.create(template="base", timeout=120, metadata={"who": "ci"}, envs={"GREETING": "hi"})
    assert s.sandbox_id.startswith("sbx-")
    info = s.get_info()
    assert info.sandbox_id == s.sandbox_id and info.metadata == {"who": "ci"}
    assert info.state.value == "running" and info.started_at is not None
    assert s.is_running()
    assert s.commands.run("echo $GREETING").stdout == "hi\n"
    before = info.end_at
    s.set_timeout(3600)
    assert s.get_info().end_at > before
    page = Sandbox.list(limit=1000)
    assert s.sandbox_id in [x["sandbox_id"] for x in page["sandboxes"]]
    assert "next_token" in page
    again = Sandbox.connect(s.sandbox_id)
    assert again.commands.run("echo same").stdout == "same\n"
    assert s.kill(wait=True) is True
    assert not s.is_running()
    assert Sandbox.connect(s.sandbox_id).get_info().state.value == "killed"
    with pytest.raises(NotFoundException):
        Sandbox.connect("sbx-0000000000000000")
    with pytest.raises(InvalidArgumentException):
        Sandbox.create(template="no-such-template")


@calls("`commands.run` (stdout, stderr, exit code exact; cwd; envs; timeout)")
def test_run(sbx):
    r = sbx.commands.run("for i in 1 2 3; do echo $i; done; echo oops >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == ("1\n2\n3\n", "oops\n", 3)
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("echo $A$B", envs={"A": "x", "B": "y"}).stdout == "xy\n"
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - t0 < 20


@calls("`commands.run_stream` (lines live, exit code)")
def test_run_stream(sbx):
    seen = []
    r = sbx.commands.run_stream(
        "echo one; sleep 1; echo two; echo bad >&2; exit 4",
        on_stdout=lambda line: seen.append((time.monotonic(), line)),
    )
    # Joined by the client with "\n", the lines give exactly what was printed.
    assert (r.stdout, r.stderr, r.exit_code) == ("one\ntwo\n", "bad\n", 4)
    assert [l for _, l in seen] == ["one", "two", ""]
    assert seen[1][0] - seen[0][0] > 0.5, "not streamed as printed"


@calls("`commands.run(background=True)`, `list`, `send_stdin`, `wait`, `kill`")
def test_background(sbx):
    h = sbx.commands.run("read x; echo got $x; exit 5", background=True)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(h.pid, "hello\n")
    with pytest.raises(declaw.CommandExitException) as e:
        h.wait()
    assert (e.value.exit_code, e.value.stdout) == (5, "got hello\n")
    sleeper = sbx.commands.run("sleep 1000", background=True)
    assert sleeper.kill() is True
    deadline = time.monotonic() + 10
    while sleeper.pid in [p.pid for p in sbx.commands.list()] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sleeper.pid not in [p.pid for p in sbx.commands.list()]


@calls("`files` write (text, bytes, batch), read (text, bytes), list (depth), exists, get_info, rename, make_dir, remove")
def test_files(sbx):
    assert sbx.files.write("/work/a.txt", "héllo").size == len("héllo".encode())
    sbx.files.write("/work/b.bin", bytes(range(256)))
    assert sbx.files.read("/work/a.txt") == "héllo"
    assert sbx.files.read("/work/b.bin", format="bytes") == bytearray(range(256))
    assert sbx.commands.run("cat /work/a.txt").stdout == "héllo"
    written = sbx.files.write_files(
        [declaw.WriteEntry(path="/work/d/x", data="x"), declaw.WriteEntry(path="/work/d/y", data="yy")]
    )
    assert [w.path for w in written] == ["/work/d/x", "/work/d/y"]
    names = sorted(e.name for e in sbx.files.list("/work"))
    assert names == ["a.txt", "b.bin", "d"]
    deep = sorted(e.path for e in sbx.files.list("/work", depth=2))
    assert "/work/d/y" in deep
    assert {e.name: e.type.value for e in sbx.files.list("/work")}["d"] == "dir"
    assert sbx.files.exists("/work/a.txt") and not sbx.files.exists("/work/nope")
    info = sbx.files.get_info("/work/d/y")
    assert (info.name, info.size, info.type.value) == ("y", 2, "file")
    moved = sbx.files.rename("/work/a.txt", "/work/c.txt")
    assert moved.path == "/work/c.txt" and not sbx.files.exists("/work/a.txt")
    assert sbx.files.make_dir("/work/new/deep") is True
    assert sbx.files.make_dir("/work/new/deep") is False
    sbx.files.remove("/work/d")
    assert not sbx.files.exists("/work/d/x")
    with pytest.raises(NotFoundException):
        sbx.files.read("/work/nope")


@calls("`pause`, `resume`; `snapshot`, `list_snapshots`, `delete_snapshot` (idempotent)")
def test_pause_and_snapshots(sbx):
    sbx.commands.run("echo kept > /root/f")
    sbx.pause()
    assert sbx.get_info().state.value == "paused" and not sbx.is_running()
    sbx.resume()
    assert sbx.commands.run("cat /root/f").stdout == "kept\n"
    snap = sbx.snapshot()
    assert snap.snapshot_id.startswith("snap-") and snap.sandbox_id == sbx.sandbox_id
    assert snap.snapshot_id in [s.snapshot_id for s in sbx.list_snapshots()]
    assert sbx.delete_snapshot(snap.snapshot_id) is True
    assert sbx.delete_snapshot(snap.snapshot_id) is True
    assert snap.snapshot_id not in [s.snapshot_id for s in sbx.list_snapshots()]


@calls("`kill_many`")
def test_kill_many():
    a, b = Sandbox.create(), Sandbox.create()
    res = Sandbox.kill_many([a.sandbox_id, b.sandbox_id, "sbx-0000000000000000"], wait=True)
    assert res[a.sandbox_id] == {"killed": True} and res[b.sandbox_id] == {"killed": True}
    assert "error" in res["sbx-0000000000000000"]
    assert not a.is_running() and not b.is_running()


@calls("network `allow_out` by name; `allow_internet_access=False`")
def test_network(sbx):
    closed = Sandbox.create(allow_internet_access=False)
    assert closed.commands.run("echo ok").stdout == "ok\n"
    closed.kill()
    named = Sandbox.create(network=declaw.SandboxNetworkOpts(allow_out=["example.invalid"]))
    assert named.commands.run("echo $HTTPS_PROXY").stdout.startswith("http://")
    named.kill()


@calls("not offered (501, saying why): `restore`, `get_metrics`, `files.watch_dir`, volumes, vault, security policies, `allow_out` addresses")
def test_what_is_not_offered(sbx):
    not_offered(lambda: Sandbox.restore(sbx.sandbox_id), "snapshot")
    not_offered(lambda: sbx.get_metrics(), "metrics")
    not_offered(lambda: sbx.files.watch_dir("/root"), "watch")
    not_offered(lambda: Sandbox.create(volumes=[{"volume_id": "v", "mount_path": "/v"}]), "volumes")
    not_offered(lambda: Sandbox.create(network=declaw.SandboxNetworkOpts(allow_out=["10.0.0.0/8"])), "host name")


@calls("raw seed 004: HTTP/2, `X-API-Key`, `{template, timeout}` → `{sandbox_id, state, started_at}`, `{\"message\"}` errors, 404, 410")
def test_raw_seed_requests():
    with httpx.Client(base_url=URL, http1=False, http2=True, headers={"X-API-Key": "dk_not_a_forkbox_key"}) as h:
        r = h.post("/sandboxes", json={"template": "base", "timeout": 300})
        assert r.http_version == "HTTP/2" and r.status_code == 201, r.text
        body = r.json()
        assert body["state"] == "running" and body["started_at"].endswith("Z")
        sid = body["sandbox_id"]
        r = h.get("/sandboxes/sbx-0000000000000000")
        assert r.status_code == 404 and "message" in r.json() and "error" not in r.json()
        r = h.post("/sandboxes", json={"template": "base", "bogus": 1})
        assert r.status_code == 400 and r.json()["message"]
        assert h.delete(f"/sandboxes/{sid}").status_code == 200
        r = h.post(f"/sandboxes/{sid}/commands", json={"cmd": "true"})
        assert r.status_code == 410 and r.json()["message"], r.text
