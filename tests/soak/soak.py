"""Bounded soak (`make soak`; SOAK_MINUTES, default 30): random create / exec /
run_code / fork / merge / pause / resume / hibernate / wake / delete against a real
`forkbox serve`, with the server SIGKILLed and restarted and sandbox agents killed along
the way. Invariants checked throughout:

- every exec stream ends with an `exit` event (unless the server was killed under it);
- no record is lost: after every restart each sandbox the soak created is still listed,
  alive ones as running/paused/hibernated or, if their processes died, `lost`/`failed`
  with a reason;
- the records match reality: a sandbox listed as running answers an exec;
- no host resources leak: at the end, after deleting everything and stopping the server,
  no subvolume and no cgroup of this run is left.

Exits non-zero on the first violation; prints a summary either way."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import forkbox_server  # noqa: E402
BIN = os.environ.get("FORKBOX_BIN", str(ROOT / "target/release/forkbox"))
AGENT = os.environ.get("FORKBOX_AGENT_BIN", str(ROOT / "target/agent/forkbox-agent"))
POOL = Path(os.environ.get("FORKBOX_TEST_POOL", "/var/lib/forkbox-test/pool"))
MINUTES = float(os.environ.get("SOAK_MINUTES", "30"))
SEED = int(os.environ.get("SOAK_SEED", str(int(time.time()))))
MAX_LIVE = 12
ALIVE = {"running", "paused", "hibernated"}


class Violation(Exception):
    pass


class Server:
    def __init__(self, data: str):
        self.data = data
        self.proc = None
        self.base = ""

    def start(self):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data, "--pool",
             str(POOL), "--agent-bin", AGENT, "--on-exit", "destroy"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "FORKBOX_LOG": "warn"})
        for line in self.proc.stdout:
            if line.startswith("forkbox listening on "):
                threading.Thread(target=lambda p=self.proc: [None for _ in p.stdout],
                                 daemon=True).start()
                self.base = line.split()[-1]
                return
        raise Violation("server did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)


def agent_pid(sid: str):
    """Host pid of sandbox `sid`'s agent (PID 1 in its namespace)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if (p / "comm").read_text().strip() != "forkbox-agent":
                continue
            if f"/{sid}\n" not in (p / "cgroup").read_text():
                continue
            status = (p / "status").read_text()
            nspid = [l for l in status.splitlines() if l.startswith("NSpid:")][0].split()
            if nspid[-1] == "1":
                return int(p.name)
        except (OSError, IndexError):
            continue
    return None


class Soak:
    def __init__(self):
        self.rng = random.Random(SEED)
        self.data = tempfile.mkdtemp(prefix="forkbox-soak-")
        self.server = Server(self.data)
        self.http = httpx.Client(timeout=120)
        self.model = {}  # id -> "running" | "paused" | "hibernated" | "broken" | "gone"
        self.parents = {}  # fork child -> parent
        # Sandbox id -> id its processes run under (cgroup name): after a merge the
        # parent carries on in the merged child's processes.
        self.resource = {}
        self.counts = {}
        self.execs = 0
        self.restarts = 0

    def url(self, path):
        return self.server.base + path

    def count(self, op):
        self.counts[op] = self.counts.get(op, 0) + 1

    def live(self, states=("running",)):
        return [i for i, s in self.model.items() if s in states]

    def check(self, cond, msg):
        if not cond:
            raise Violation(msg)

    def ended(self, sid, status):
        """`sid` answered 410 or 502 though we did not end it: its agent died (ours was
        killed, or its fork parent's, whose PID namespace it lived in). Its record must
        say so, with a reason, once the server noticed."""
        if status == 410:
            # 410 "ending": the record settles once its processes are gone.
            deadline = time.time() + 15
            d = self.records().get(sid, {})
            while d.get("status") in ALIVE and time.time() < deadline:
                time.sleep(0.2)
                d = self.records().get(sid, {})
            self.check(d.get("status") in ("failed", "lost") and d.get("end_reason") != "",
                       f"{sid} answered 410 but its record is {d}")
        self.model[sid] = "broken"

    def records(self):
        """Every sandbox record of the server, ended ones included, by id."""
        out, token = {}, None
        while True:
            params = {"status": "all", "limit": 1000}
            if token:
                params["next_token"] = token
            r = self.http.get(self.url("/v1/sandboxes"), params=params)
            self.check(r.status_code == 200, f"list: {r.status_code}")
            page = r.json()
            out.update({s["id"]: s for s in page["sandboxes"]})
            token = page.get("next_token")
            if not token:
                return out

    # --- operations ---
    def op_create(self):
        if len(self.live(("running", "paused", "hibernated", "broken"))) >= MAX_LIVE:
            return self.op_delete()
        r = self.http.post(self.url("/v1/sandboxes"), json={"memory_mb": 256, "timeout": 7200})
        self.check(r.status_code == 201, f"create: {r.status_code} {r.text}")
        self.model[r.json()["id"]] = "running"

    def exec_stream(self, sid, body):
        """Runs an exec: its status and events (the error body as one event if not 200)."""
        events = []
        with self.http.stream("POST", self.url(f"/v1/sandboxes/{sid}/exec"), json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, [r.text]
            for line in r.iter_lines():
                if line.strip():
                    events.append(json.loads(line))
        self.execs += 1
        return 200, events

    def op_exec(self):
        ids = self.live()
        if not ids:
            return self.op_create()
        sid = self.rng.choice(ids)
        n = self.rng.randint(1, 200)
        st, ev = self.exec_stream(sid, {"cmd": f"seq {n}; echo err >&2"})
        if st in (410, 502):
            return self.ended(sid, st)
        self.check(st == 200, f"exec on {sid}: {st}")
        self.check(ev and ev[-1]["type"] == "exit", f"exec on {sid} did not end with exit: {ev[-3:]}")
        out = "".join(e["data"] for e in ev if e["type"] == "stdout")
        self.check(out == "".join(f"{i}\n" for i in range(1, n + 1)), f"exec output on {sid}")

    def op_run_code(self):
        ids = self.live()
        if not ids:
            return self.op_create()
        sid = self.rng.choice(ids)
        st, ev = self.exec_stream(sid, {"code": "n = globals().get('n', 0) + 1\nprint(n)"})
        if st in (410, 502):
            return self.ended(sid, st)
        self.check(st == 200 and ev and ev[-1]["type"] == "exit", f"run_code on {sid}: {st} {ev[-3:]}")

    def op_fork(self):
        ids = self.live()
        room = MAX_LIVE - len(self.live(("running", "paused", "hibernated", "broken")))
        if not ids or room < 1:
            return self.op_delete()
        sid = self.rng.choice(ids)
        n = self.rng.randint(1, min(3, room))
        r = self.http.post(self.url(f"/v1/sandboxes/{sid}/fork"), json={"n": n})
        if r.status_code in (410, 502):
            return self.ended(sid, r.status_code)
        self.check(r.status_code in (200, 409), f"fork {sid}: {r.status_code} {r.text}")
        if r.status_code == 200:
            for c in r.json()["children"]:
                self.model[c] = "running"
                self.parents[c] = sid

    def op_merge(self):
        kids = [c for c in self.live() if self.model.get(self.parents.get(c)) == "running"]
        if not kids:
            return self.op_fork()
        c = self.rng.choice(kids)
        p = self.parents[c]
        r = self.http.post(self.url(f"/v1/sandboxes/{p}/merge_into/{c}"))
        self.check(r.status_code in (200, 409, 410, 502), f"merge {c} into {p}: {r.status_code} {r.text}")
        if r.status_code == 200:
            self.model[c] = "gone"
            self.resource[p] = self.resource.get(c, c)

    def op_pause_resume(self):
        paused = self.live(("paused",))
        if paused and self.rng.random() < 0.6:
            sid = self.rng.choice(paused)
            r = self.http.post(self.url(f"/v1/sandboxes/{sid}/resume"))
            if r.status_code in (410, 502):
                return self.ended(sid, r.status_code)
            self.check(r.status_code == 200, f"resume {sid}: {r.status_code} {r.text}")
            self.model[sid] = "running"
            return
        ids = self.live()
        if not ids:
            return
        sid = self.rng.choice(ids)
        r = self.http.post(self.url(f"/v1/sandboxes/{sid}/pause"))
        if r.status_code in (410, 502):
            return self.ended(sid, r.status_code)
        self.check(r.status_code == 200, f"pause {sid}: {r.status_code} {r.text}")
        if r.status_code == 200:
            self.model[sid] = "paused"
            st, _ = self.exec_stream(sid, {"cmd": "true"})
            self.check(st == 409, f"exec on paused {sid}: {st}")

    def op_hibernate_wake(self):
        hib = self.live(("hibernated",))
        if hib and self.rng.random() < 0.6:
            sid = self.rng.choice(hib)
            r = self.http.post(self.url(f"/v1/sandboxes/{sid}/wake"))
            if r.status_code == 410:
                # Its fork parent's agent was killed before it was hibernated.
                return self.ended(sid, 410)
            self.check(r.status_code in (200, 429),
                       f"wake {sid}: {r.status_code} {r.text} {self.records().get(sid)}")
            if r.status_code == 200:
                self.model[sid] = "running"
            return
        ids = self.live()
        if not ids:
            return
        sid = self.rng.choice(ids)
        r = self.http.post(self.url(f"/v1/sandboxes/{sid}/hibernate"))
        if r.status_code in (410, 502):
            return self.ended(sid, r.status_code)
        # 409: it has live fork descendants.
        self.check(r.status_code in (200, 409), f"hibernate {sid}: {r.status_code} {r.text}")
        if r.status_code == 200:
            self.model[sid] = "hibernated"

    def op_delete(self):
        ids = self.live(("running", "paused", "hibernated", "broken"))
        if not ids:
            return
        sid = self.rng.choice(ids)
        r = self.http.delete(self.url(f"/v1/sandboxes/{sid}"))
        self.check(r.status_code in (204, 410), f"delete {sid}: {r.status_code} {r.text}")
        self.model[sid] = "gone"

    def op_kill_agent(self):
        """Kills a sandbox's agent; its fork descendants (nested in its PID namespace)
        die with it, which later calls on them find out (410/502)."""
        ids = self.live()
        if not ids:
            return
        sid = self.rng.choice(ids)
        pid = agent_pid(self.resource.get(sid, sid))
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        st, ev = self.exec_stream(sid, {"cmd": "true"})
        self.check(st in (502, 410), f"exec after killing {sid}'s agent: {st} {ev}")
        self.model[sid] = "broken"

    def op_restart(self):
        self.server.kill()
        self.server.start()
        self.restarts += 1
        self.verify_records()

    # --- invariants ---
    def verify_records(self):
        listed = self.records()
        for sid, state in self.model.items():
            self.check(sid in listed, f"record of {sid} ({state}) is gone after a restart")
            s = listed[sid]["status"]
            if state in ALIVE:
                ok = s in ALIVE or (s in ("lost", "failed"))
                self.check(ok, f"{sid}: we hold it {state}, the server says {s}")
                if s in ("lost", "failed"):
                    self.model[sid] = "broken"
                elif s != state:
                    self.model[sid] = s
            if listed[sid]["status"] == "running" and self.model[sid] == "running":
                st, ev = self.exec_stream(sid, {"cmd": "echo ok"})
                if st in (410, 502):
                    self.ended(sid, st)
                else:
                    self.check(st == 200 and ev[-1]["type"] == "exit",
                               f"{sid} listed running but exec gave {st} {ev[-1:]}")

    def leaks(self):
        ids = set(self.model)
        left = [p.name for p in (POOL / "sandboxes").iterdir() if p.name in ids]
        cg = []
        for root in [Path("/sys/fs/cgroup")] + list(Path("/sys/fs/cgroup").glob("*")):
            d = root / "forkbox"
            if d.is_dir():
                cg += [c.name for c in d.iterdir() if c.name in ids]
        return left, cg

    def run(self):
        self.server.start()
        ops = [(self.op_create, 15), (self.op_exec, 25), (self.op_run_code, 15),
               (self.op_fork, 8), (self.op_merge, 4), (self.op_pause_resume, 8),
               (self.op_hibernate_wake, 5), (self.op_delete, 12), (self.op_kill_agent, 2),
               (self.op_restart, 1)]
        fns = [f for f, _ in ops]
        weights = [w for _, w in ops]
        deadline = time.time() + MINUTES * 60
        ok = False
        try:
            while time.time() < deadline:
                f = self.rng.choices(fns, weights)[0]
                self.count(f.__name__[3:])
                t = time.time()
                f()
                if time.time() - t > 10:
                    print(f"slow: {f.__name__} took {time.time() - t:.1f}s", file=sys.stderr)
                    self.count("slow")
            self.verify_records()
            for sid in [s for s, st in self.model.items() if st != "gone"]:
                r = self.http.delete(self.url(f"/v1/sandboxes/{sid}"))
                self.check(r.status_code in (204, 410), f"final delete {sid}: {r.status_code}")
                self.model[sid] = "gone"
            self.server.stop()
            left, cg = self.leaks()
            self.check(not left and not cg, f"leaked subvolumes {left}, cgroups {cg}")
            ok = True
        except Violation as v:
            print(f"SOAK VIOLATION: {v}", file=sys.stderr)
        except httpx.HTTPError as e:
            print(f"SOAK VIOLATION: request failed: {e!r}", file=sys.stderr)
        finally:
            if self.server.proc and self.server.proc.poll() is None:
                self.server.stop()
            forkbox_server.down(self.data, str(POOL))
        print(json.dumps({
            "ok": ok, "seed": SEED, "minutes": MINUTES, "sandboxes": len(self.model),
            "execs": self.execs, "server_restarts": self.restarts, "ops": self.counts,
        }, sort_keys=True))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(Soak().run())
