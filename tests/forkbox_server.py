"""Starts and stops a real `forkbox serve` (the one `make test` built) for the Python
test suites: the SDK's tests and the API fuzzing."""
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(log_level: str = "warn", log_file=None, extra=()):
    """Returns the process and its base URL once it listens; its log goes to
    `log_file` (a path) when given; `extra`: more `forkbox serve` arguments."""
    binary = os.environ.get("FORKBOX_BIN", str(ROOT / "target/debug/forkbox"))
    agent = os.environ.get("FORKBOX_AGENT_BIN", str(ROOT / "target/agent/forkbox-agent"))
    pool = os.environ.get("FORKBOX_TEST_POOL", "/var/lib/forkbox-test/pool")
    data = tempfile.mkdtemp(prefix="forkbox-py-")
    err = open(log_file, "w") if log_file else None
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--pool", pool,
         "--agent-bin", agent, "--on-exit", "destroy", *extra],
        stdout=subprocess.PIPE, stderr=err, text=True,
        env={**os.environ, "FORKBOX_LOG": log_level},
    )
    for line in proc.stdout:
        if line.startswith("forkbox listening on "):
            # Keep draining stdout so the server never blocks on it.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split()[-1]
    stop(proc)
    raise RuntimeError("forkbox serve did not start")


def stop(proc) -> None:
    """Stops the server, takes its data dir down (`forkbox down --purge`: nothing of it
    stays on the host, even if the server had to be killed) and deletes it."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    down(proc.args[proc.args.index("--data-dir") + 1], proc.args[proc.args.index("--pool") + 1])


def down(data: str, pool: str) -> None:
    """`forkbox down --purge` on a test data dir, then deletes the dir."""
    binary = os.environ.get("FORKBOX_BIN", str(ROOT / "target/debug/forkbox"))
    subprocess.run([binary, "down", "--purge", "--data-dir", data, "--pool", pool],
                   check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "FORKBOX_LOG": "warn"})
    shutil.rmtree(data, ignore_errors=True)
