#!/usr/bin/env python3
"""Cluster figures for docs/cluster.md (`make bench-cluster`, under a throwaway
PostgreSQL from scripts/with-postgres.sh): the exec round trip of a sandbox called
directly on its node and through another node (forwarding's overhead), and creates per
second through one node with one, two and three nodes up. Each run is measured back to
back in the same process; nodes are real `forkbox serve` processes on this machine."""
import concurrent.futures as cf
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.environ.get("FORKBOX_BIN", "target/release/forkbox")
AGENT = os.environ.get("FORKBOX_AGENT_BIN", "target/agent/forkbox-agent")
POOL = os.environ["FORKBOX_TEST_POOL"]
BASE_DB = os.environ["FORKBOX_TEST_DATABASE_URL"]


def database(name):
    subprocess.run(["psql", BASE_DB, "-q", "-c", f"CREATE DATABASE {name}"], check=True)
    return f"{BASE_DB}&dbname={name}" if "?" in BASE_DB else f"{BASE_DB}?dbname={name}"


class Node:
    def __init__(self, db, name):
        self.name = name
        self.data = tempfile.mkdtemp(prefix="forkbox-cb-")
        self.env = dict(os.environ, FORKBOX_DATABASE_URL=db, FORKBOX_NODE=name, FORKBOX_LOG="warn")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data, "--pool", POOL,
             "--agent-bin", AGENT, "--on-exit", "destroy"],
            env=self.env, stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            if line.startswith("forkbox listening on http://"):
                self.addr = line.strip().rsplit("/", 1)[1]
                break
        host, port = self.addr.split(":")
        self.conn = http.client.HTTPConnection(host, int(port))

    def call(self, method, path, body=None, headers=None):
        h = {"content-type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
        r = self.conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data else None)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        subprocess.run([BIN, "down", "--purge", "--data-dir", self.data, "--pool", POOL],
                       env=self.env, capture_output=True)
        subprocess.run(["rm", "-rf", self.data])


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def exec_rtt(nodes, n=400):
    st, sb = nodes[0].call("POST", "/v1/sandboxes", {})
    assert st == 201, sb
    sid = sb["id"]
    # Direct: the node placement chose; forwarded: another.
    a = next(n for n in nodes if n.name == sb["node"])
    b = next(n for n in nodes if n.name != sb["node"])
    direct, forwarded = [], []
    body = {"cmd": "true", "wait": True}
    for i in range(n + 40):
        for node, out in ((a, direct), (b, forwarded)):
            t = time.perf_counter()
            st, r = node.call("POST", f"/v1/sandboxes/{sid}/exec", body)
            dt = (time.perf_counter() - t) * 1000
            assert st == 200, r
            if i >= 40:
                out.append(dt)
    a.call("DELETE", f"/v1/sandboxes/{sid}")
    return direct, forwarded


def creates_per_s(entry, n=24, workers=8):
    def one(_):
        c = http.client.HTTPConnection(*entry.addr.split(":"))
        c.request("POST", "/v1/sandboxes", body="{}", headers={"content-type": "application/json"})
        r = c.getresponse()
        v = json.loads(r.read())
        assert r.status == 201, v
        return v["id"], v.get("node")
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as ex:
        made = list(ex.map(one, range(n)))
    rate = n / (time.perf_counter() - t)
    for sid, _ in made:
        entry.call("DELETE", f"/v1/sandboxes/{sid}")
    return rate, sorted({m for _, m in made})


def main():
    db = database(f"fbb_{os.getpid()}")
    nodes = [Node(db, "a")]
    rows = []
    try:
        rate1, _ = creates_per_s(nodes[0])
        nodes.append(Node(db, "b"))
        nodes[0].call("GET", "/v1/nodes")
        direct, fwd = exec_rtt(nodes)
        rate2, on2 = creates_per_s(nodes[0])
        nodes.append(Node(db, "c"))
        nodes[0].call("GET", "/v1/nodes")
        rate3, on3 = creates_per_s(nodes[0])
        p50d, p50f = statistics.median(direct), statistics.median(fwd)
        print("| measure | value |")
        print("|---|---|")
        print(f"| exec round trip, on the sandbox's node (p50 / p90) | {p50d:.2f} / {pct(direct, .9):.2f} ms |")
        print(f"| exec round trip, through another node (p50 / p90) | {p50f:.2f} / {pct(fwd, .9):.2f} ms |")
        print(f"| forwarding overhead (p50) | {p50f - p50d:.2f} ms |")
        print(f"| creates/s through one node, 1 node up | {rate1:.1f} |")
        print(f"| creates/s through one node, 2 nodes up (made on {', '.join(on2)}) | {rate2:.1f} |")
        print(f"| creates/s through one node, 3 nodes up (made on {', '.join(on3)}) | {rate3:.1f} |")
    finally:
        for n in nodes:
            n.stop()


if __name__ == "__main__":
    sys.exit(main())
