"""The SDK against a real server: every method, streaming order, error mapping,
context-manager cleanup, and the seed 001 examples."""
import asyncio
import io
import os

import pytest

import forkbox
import podflare
from forkbox import AsyncSandbox, Client, Sandbox


def test_context_manager_creates_and_deletes_even_on_exception():
    holder = {}
    with pytest.raises(RuntimeError):
        with Sandbox() as s:
            holder["id"] = s.id
            assert s.status == "running"
            raise RuntimeError("boom")
    with pytest.raises(forkbox.Gone) as e:
        Sandbox(id=holder["id"]).refresh()
    assert e.value.status == 410 and e.value.code == "gone"


def test_run_code_keeps_state_and_streams_in_order():
    with Sandbox() as s:
        assert s.run_code("x = 41").exit_code == 0
        r = s.run_code("x + 1")
        assert (r.stdout, r.exit_code) == ("42\n", 0)
        err = s.run_code("1/0")
        assert err.exit_code == 1 and "ZeroDivisionError" in err.stderr
        evs = list(s.run_code_stream("for i in range(3): print(i)"))
        assert [e.type for e in evs] == ["stdout", "stdout", "stdout", "exit"]
        assert [e.data for e in evs[:3]] == ["0\n", "1\n", "2\n"]
        assert [e.seq for e in evs] == [1, 2, 3, 4]
        assert evs[-1].code == 0 and all(e.ts > 0 for e in evs)
        assert s.run_code("echo $((2+3))", language="bash").stdout == "5\n"


def test_exec_and_errors_map_to_typed_exceptions():
    with Sandbox(env={"GREETING": "hi"}) as s:
        r = s.exec("echo $GREETING; echo oops >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "oops\n", 3)
        assert s.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
        with pytest.raises(forkbox.BadRequest):
            s.fork(33)
        s.pause()
        with pytest.raises(forkbox.Conflict) as e:
            s.pause()
        assert e.value.status == 409
        s.resume()
    with pytest.raises(forkbox.NotFound):
        Sandbox(id="sbx-doesnotexist").refresh()


def test_fork_and_merge_into():
    with Sandbox() as s:
        s.run_code("data = list(range(1000)); tag = 'parent'")
        s.files.write("/root/f.txt", "parent")
        kids = s.fork(3)
        try:
            assert [k.run_code("len(data), tag").stdout for k in kids] == ["(1000, 'parent')\n"] * 3
            kids[1].run_code("tag = 'child1'")
            kids[1].files.write("/root/f.txt", "child1")
            s.merge_into(kids[1])
            assert s.run_code("tag").stdout == "'child1'\n"
            assert s.files.read_text("/root/f.txt") == "child1"
            with pytest.raises(forkbox.Gone):
                kids[1].run_code("1")
            assert kids[0].run_code("tag").stdout == "'parent'\n"
        finally:
            for k in kids:
                k.kill()


def test_files_api(tmp_path):
    with Sandbox() as s:
        assert s.files.write("notes/a.txt", "hello")["path"] == "/root/notes/a.txt"
        assert s.files.read("/root/notes/a.txt") == b"hello"
        assert [e["name"] for e in s.files.list("/root/notes")] == ["a.txt"]
        assert s.files.stat("/root/notes")["type"] == "dir"
        s.files.mkdir("/tmp/x/y")
        s.files.rename("/root/notes/a.txt", "/tmp/x/y/b.txt")
        assert s.files.exists("/tmp/x/y/b.txt") and not s.files.exists("/root/notes/a.txt")
        s.files.remove("/tmp/x", recursive=True)
        assert not s.files.exists("/tmp/x")
        big = os.urandom(3 << 20)
        src, dst = tmp_path / "big.bin", tmp_path / "back.bin"
        src.write_bytes(big)
        assert s.files.upload(src, "/root/big.bin")["size"] == len(big)
        assert s.files.download("/root/big.bin", dst) == len(big)
        assert dst.read_bytes() == big
        assert s.files.upload(io.BytesIO(b"xyz"), "/root/small")["size"] == 3
        with pytest.raises(forkbox.NotFound):
            s.files.read("/nope")
        with pytest.raises(forkbox.BadRequest):
            s.files.read("../etc/shadow")


def test_background_commands():
    with Sandbox() as s:
        cmd = s.commands.start("cat; echo done")
        assert any(c["pid"] == cmd.pid for c in s.commands.list())
        cmd.send_stdin("typed\n", close=True)
        assert cmd.wait() == 0
        out = "".join(e.data for e in cmd.output() if e.type == "stdout")
        assert out == "typed\ndone\n"
        sleeper = s.commands.start("sleep 100")
        sleeper.kill()
        assert sleeper.wait() == 137


def test_lifecycle_snapshot_hibernate_and_events():
    client = Client()
    with Sandbox(client=client) as s:
        s.files.write("/root/keep", "1")
        snap = s.snapshot("base")
        assert snap["id"].startswith("snap-")
        with Sandbox(client=client, snapshot=snap["id"]) as t:
            assert t.files.read_text("/root/keep") == "1"
        client.delete_snapshot(snap["id"])
        assert s.hibernate()["status"] == "hibernated"
        assert s.wake()["memory_restored"] is False
        assert s.files.read_text("/root/keep") == "1"
        kinds = [e["type"] for e in s.events()]
        assert kinds[:1] == ["created"] and "hibernated" in kinds and "woken" in kinds
        assert any(x["id"] == s.id for x in client.sandboxes())
    client.close()


def test_code_contexts_and_ports():
    with Sandbox() as s:
        a, b = s.create_context(), s.create_context()
        a.run("x = 1")
        b.run("x = 2")
        r = a.run("print(x)\nx * 10")
        assert (r["stdout"], r["results"][0]["text/plain"], r["exit_code"]) == ("1\n", "10", 0)
        assert b.run("print(x)")["stdout"] == "2\n"
        assert "ZeroDivisionError" in a.run("1/0")["error"]
        # run_code in a context streams like any cell; each context keeps its cwd.
        s.exec("mkdir -p /root/work")
        w = s.create_context(cwd="/root/work")
        assert s.run_code("import os\nos.getcwd()", context=w).stdout == "'/root/work'\n"
        assert s.run_code("x + 1", context=b).stdout == "3\n"
        js = s.create_context("javascript", cwd="/tmp")
        assert js.language == "javascript" and js.id.startswith("ctxjs-")
        assert s.run_code("let y = 6; y * 7", context=js).stdout == "42\n"
        assert s.run_code("process.cwd()", context=js.id).text == "'/tmp'\n"
        assert js.run("typeof y")["results"][0]["text/plain"] == "'number'"
        kid = s.fork(1)[0]
        assert kid.context(b.id).run("print(x)")["stdout"] == "2\n"
        b.close()
        with pytest.raises(forkbox.NotFound):
            b.run("x")
        kid.kill()
        s.files.write("/root/www/hi.txt", "hi from the sandbox\n")
        s.commands.start("cd /root/www && exec python3 -m http.server 8000")
        for _ in range(100):
            if any(p["port"] == 8000 for p in s.ports()):
                break
            import time

            time.sleep(0.1)
        assert [p["path"] for p in s.ports() if p["port"] == 8000] == [f"/v1/sandboxes/{s.id}/ports/8000/"]
        assert s.client.request("GET", s.port_url(8000, "hi.txt")).text == "hi from the sandbox\n"
        link = s.public_link(8000, expires_in=600)
        assert link["url"] == f"http://{link['host']}/" and link["port"] == 8000
        # Opened by its host, with no key: a plain client (no SDK auth), Host set by hand.
        import httpx

        got = httpx.get(s.client.base_url + "/hi.txt", headers={"host": link["host"]})
        assert (got.status_code, got.text) == (200, "hi from the sandbox\n")

    async def main():
        async with AsyncSandbox() as s:
            c = await s.create_context()
            await c.run("z = 5")
            assert (await c.run("print(z)"))["stdout"] == "5\n"
            assert (await s.run_code("print('z' in globals())")).stdout == "False\n"
            assert (await s.run_code("z * 2", context=c)).stdout == "10\n"
            j = await s.create_context("javascript")
            assert (await s.run_code("1 + 1", context=j)).stdout == "2\n"
            await c.close()
            assert await s.ports() == []

    asyncio.run(main())


def test_async_sandbox():
    async def main():
        async with AsyncSandbox() as s:
            await s.run_code("y = 20")
            assert (await s.run_code("y * 2")).stdout == "40\n"
            evs = [e async for e in s.run_code_stream("print('a'); print('b')")]
            assert [e.type for e in evs] == ["stdout", "stdout", "exit"]
            assert (await s.exec("echo hi")).stdout == "hi\n"
            await s.write_file("/root/a", "x")
            assert await s.read_file("/root/a") == b"x"
            kids = await s.fork(2)
            assert (await kids[0].run_code("y")).stdout == "20\n"
            await s.merge_into(kids[0])
            for k in kids[1:]:
                await k.kill()
            with pytest.raises(forkbox.Gone):
                await kids[0].run_code("1")

    asyncio.run(main())


def test_seed_001_examples_run_unchanged(capsys):
    from podflare import Sandbox, Client  # noqa: F811 - exactly as in the seed

    with Sandbox() as s:
        for event in s.run_code_stream("for i in range(3): print(i)"):
            if event.type == "stdout":
                print(f"[{event.seq}] out: {event.data}", end="")
            elif event.type == "stderr":
                print(f"[{event.seq}] err: {event.data}", end="")
            elif event.type == "exit":
                print(f"exit code: {event.code}")
    assert capsys.readouterr().out == "[1] out: 0\n[2] out: 1\n[3] out: 2\nexit code: 0\n"

    with Sandbox(traceparent="00-4bf92f3564d486ad-00f067aa0ba902b7-01") as s:
        s.run_code("print('traced')")
    client = Client(traceparent="00-4bf92f3564d486ad-00f067aa0ba902b7-01")
    with Sandbox(client=client) as s:
        s.run_code("print('also traced')")
    os.environ["PODFLARE_TRACEPARENT"] = "00-4bf92f3564d486ad-00f067aa0ba902b7-01"
    try:
        with Sandbox() as s:
            assert s.run_code("print('env traced')").stdout == "env traced\n"
    finally:
        del os.environ["PODFLARE_TRACEPARENT"]
    assert podflare.Sandbox is forkbox.Sandbox


def test_metrics_parse_and_move():
    import httpx
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    url = os.environ["FORKBOX_URL"]

    def sample(name, labels=None):
        text = httpx.get(f"{url}/metrics").text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    return s.value
        return 0.0

    created = sample("forkbox_sandboxes_created_total")
    forks = sample("forkbox_forks_total")
    cmds = sample("forkbox_execs_total", {"kind": "command"})
    gone = sample("forkbox_http_errors_total", {"code": "gone"})
    with Sandbox() as s:
        s.exec("true")
        kids = s.fork(2)
        assert sample("forkbox_sandboxes_live") >= 3
        for k in kids:
            k.kill()
    with pytest.raises(forkbox.Gone):
        Sandbox(id=s.id).refresh()
    assert sample("forkbox_sandboxes_created_total") == created + 3
    assert sample("forkbox_forks_total") == forks + 1
    assert sample("forkbox_execs_total", {"kind": "command"}) == cmds + 1
    assert sample("forkbox_http_errors_total", {"code": "gone"}) >= gone + 1
    assert sample("forkbox_fork_seconds_count") >= 1


def test_files_watch():
    import threading

    with Sandbox() as s:
        s.files.mkdir("/root/w")
        seen = []

        def watch():
            for ev in s.files.watch("/root/w", recursive=True):
                seen.append((ev["type"], ev.get("path")))
                if ev["type"] == "delete":
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        import time

        time.sleep(0.5)
        s.exec("echo 1 > /root/w/a && rm /root/w/a")
        t.join(timeout=20)
        assert ("create", "/root/w/a") in seen and ("delete", "/root/w/a") in seen, seen
