#!/usr/bin/env python3
"""Profiles forkbox's slow paths with `perf` and writes collapsed stacks for inferno.

Run by `scripts/flamegraph.sh` (`make flamegraph`) against a `forkbox serve` it started:

  flame.py --url URL --out DIR [--rounds N]

Three scenarios, each profiled twice while it runs in a loop:
  fork32, fork5  a parent whose REPL holds ~200 MB forked into 32 (5) children
          (children deleted between rounds, outside the profile);
  create  cold creates (the server runs without a warm pool), each deleted outside the
          profile.
and two profiles of each:
  cpu     `perf record -a -g` at 999 Hz: where the CPUs were busy (every process on the
          host: server, jail-init, agents, kernel threads);
  offcpu  `perf record -e sched:sched_switch -a -g`: where threads waited, weighted by
          how long (switch-out to the next switch-in of the same thread), waits for
          other user-space work (futex, epoll, poll, nanosleep, wait4, pipe and socket
          reads, accept, ptrace stops) and kernel threads' idle loops left out, so what
          remains is time blocked in the kernel's own work (RCU grace periods, locks,
          I/O) and, as one frame per process, time runnable but waiting for a CPU.

Writes DIR/<scenario>-<profile>.folded (inferno's collapsed format, weights: samples for
cpu, microseconds for offcpu) and DIR/<scenario>.json (the round times).
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

BIG_STATE = "blob = [bytes(1000) for _ in range(200_000)]\nlen(blob)"


def call(method, url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text  # exec's NDJSON


class Perf:
    """`perf record` over the host while the block runs."""

    def __init__(self, out, args):
        self.out, self.args = out, args

    def __enter__(self):
        self.p = subprocess.Popen(["perf", "record", "-q", "-a", "-g", "-o", self.out] + self.args,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # perf is recording before the first round
        if self.p.poll() is not None:
            sys.exit(f"perf record failed: {self.p.stderr.read().decode()}")
        return self

    def __exit__(self, *exc):
        self.p.send_signal(signal.SIGINT)
        self.p.wait(timeout=120)


def perf_script(data):
    return subprocess.run(["perf", "script", "-i", data, "-F", "comm,tid,time,event,trace,ip,sym"],
                          capture_output=True, text=True, check=True).stdout


# Waits for other user-space work (a reply, a child, a timer, a connection) and kernel
# threads' idle loops: what the off-CPU graph leaves out.
USER_WAITS = re.compile(r"^(futex_wait|do_futex|ep_poll|do_epoll_wait|do_sys_poll|do_select|"
                        r"do_nanosleep|hrtimer_nanosleep|kernel_wait4|do_wait|pipe_read|"
                        r"anon_pipe_read|unix_accept|__skb_wait_for_more_packets|"
                        r"unix_stream_read_generic|tcp_recvmsg_locked|wait_woken|do_sigtimedwait|"
                        r"worker_thread|smpboot_thread_fn|kthreadd|kthread_worker_fn|kcompactd|"
                        r"kdamond_fn|khugepaged|rcu_gp_kthread|rescuer_thread|do_idle|"
                        r"schedule_idle|pidfd_poll|ptrace_stop)$")
# Preempted while runnable: time spent waiting for a CPU, whatever the thread was doing.
PREEMPTED = re.compile(r"^(exit_to_user_mode_loop|irqentry_exit_to_user_mode|"
                       r"preempt_schedule\w*|__cond_resched)$")


def events(text):
    """(header, [frames leaf first]) per event of `perf script`."""
    for block in text.split("\n\n"):
        lines = [l for l in block.split("\n") if l.strip()]
        if not lines:
            continue
        frames = []
        for l in lines[1:]:
            parts = l.split(None, 1)
            sym = parts[1] if len(parts) > 1 else parts[0]
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym.split(" (")[0])
            frames.append(sym if sym != "[unknown]" else "[unknown]")
        yield lines[0], frames


def fold_cpu(text):
    folded = {}
    for header, frames in events(text):
        comm = header.split()[0]
        if comm == "swapper":  # an idle CPU
            continue
        key = ";".join([comm] + list(reversed(frames)))
        folded[key] = folded.get(key, 0) + 1
    return folded


SWITCH = re.compile(r"^(?P<comm>.+?)\s+(?P<tid>\d+)\s+(?P<t>\d+\.\d+):\s+sched:sched_switch:.*"
                    r"prev_pid=(?P<prev>\d+).*next_pid=(?P<next>\d+)")


def fold_offcpu(text):
    """Blocked time per stack: from a thread's switch-out to its next switch-in."""
    out_at = {}
    folded = {}
    for header, frames in events(text):
        m = SWITCH.match(header.strip())
        if not m:
            continue
        t = float(m["t"])
        nxt = int(m["next"])
        if nxt in out_at:
            since, key = out_at.pop(nxt)
            if key is not None:
                folded[key] = folded.get(key, 0) + int((t - since) * 1e6)
        prev = int(m["prev"])
        if prev == 0:
            continue
        # perf's stack of a switch event is the switching-out thread's (prev).
        wait = next((f for f in frames if f not in ("__schedule", "schedule", "__traceiter_sched_switch",
                                                   "schedule_preempt_disabled", "schedule_timeout",
                                                   "__schedule_loop")), "")
        if any(USER_WAITS.match(f) for f in frames):
            out_at[prev] = (t, None)
            continue
        if PREEMPTED.match(wait):
            out_at[prev] = (t, m["comm"].strip() + ";[runnable, waiting for a CPU]")
            continue
        out_at[prev] = (t, ";".join([m["comm"].strip()] + list(reversed(frames))))
    return folded


def write_folded(path, folded):
    with open(path, "w") as f:
        for k, v in sorted(folded.items()):
            if v > 0:
                f.write(f"{k} {v}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    base = a.url.rstrip("/")

    parent = call("POST", f"{base}/v1/sandboxes", {"memory_mb": 2048})["id"]
    text = call("POST", f"{base}/v1/sandboxes/{parent}/exec", {"code": BIG_STATE})
    if "200000" not in str(text):
        sys.exit(f"building the REPL state failed: {text}")
    report = {}
    for scenario in ("fork32", "fork5", "create"):
        for profile, extra in (("cpu", ["-F", "999"]), ("offcpu", ["-e", "sched:sched_switch"])):
            times = []
            for _ in range(a.rounds * (4 if scenario == "create" else 1)):
                kids, made = [], []
                data = os.path.join(a.out, f"{scenario}-{profile}.data")
                with Perf(data, extra):
                    t = time.monotonic()
                    if scenario.startswith("fork"):
                        n = int(scenario[4:])
                        v = call("POST", f"{base}/v1/sandboxes/{parent}/fork", {"n": n})
                        if len(v.get("children", [])) != n or "python" not in v.get("carried", []):
                            sys.exit(f"fork answered {v}")
                        kids = v["children"]
                    else:
                        made = [call("POST", f"{base}/v1/sandboxes", {})["id"]]
                    times.append(round((time.monotonic() - t) * 1e3, 2))
                for c in kids + made:
                    call("DELETE", f"{base}/v1/sandboxes/{c}")
                text = perf_script(data)
                fold = fold_cpu(text) if profile == "cpu" else fold_offcpu(text)
                acc = report.setdefault(f"{scenario}-{profile}", {})
                for k, v in fold.items():
                    acc[k] = acc.get(k, 0) + v
                os.unlink(data)
            report[f"{scenario}-{profile}-ms"] = times
    call("DELETE", f"{base}/v1/sandboxes/{parent}")
    summary = {}
    for key in list(report):
        if key.endswith("-ms"):
            summary[key] = report[key]
            continue
        write_folded(os.path.join(a.out, f"{key}.folded"), report[key])
    with open(os.path.join(a.out, "rounds.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
