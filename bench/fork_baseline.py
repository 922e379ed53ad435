"""The "bare process fork" baseline of `make bench`'s fork rows: a python3 whose heap
holds ~200 MB (200 000 objects of 1000 bytes, like the bench's parent REPL) forks k
children; a sample is the time until every child has run (written a byte to a pipe).
Usage: fork_baseline.py SAMPLES K... ; prints {"K": [ms, ...], ...} as JSON, after one
untimed warm-up per K."""
import json
import os
import sys
import time

blob = [bytes(1000) for _ in range(200_000)]


def sample(k):
    r, w = os.pipe()
    t = time.perf_counter()
    pids = []
    for _ in range(k):
        pid = os.fork()
        if pid == 0:
            os.write(w, b"x")
            os._exit(0)
        pids.append(pid)
    got = 0
    while got < k:
        got += len(os.read(r, k - got))
    took = (time.perf_counter() - t) * 1000
    for p in pids:
        os.waitpid(p, 0)
    os.close(r)
    os.close(w)
    return took


def main():
    samples = int(sys.argv[1])
    out = {}
    for k in (int(a) for a in sys.argv[2:]):
        sample(k)
        out[str(k)] = [sample(k) for _ in range(samples)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
