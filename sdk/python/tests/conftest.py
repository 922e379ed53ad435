"""Starts a real `forkbox serve` (the one `make test` built) for the SDK tests."""
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session", autouse=True)
def server():
    binary = os.environ.get("FORKBOX_BIN", str(ROOT / "target/debug/forkbox"))
    agent = os.environ.get("FORKBOX_AGENT_BIN", str(ROOT / "target/agent/forkbox-agent"))
    pool = os.environ.get("FORKBOX_TEST_POOL", "/var/lib/forkbox-test/pool")
    data = tempfile.mkdtemp(prefix="forkbox-sdk-")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--pool", pool,
         "--agent-bin", agent, "--on-exit", "destroy"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "FORKBOX_LOG": "warn"},
    )
    url = None
    for line in proc.stdout:
        if line.startswith("forkbox listening on "):
            url = line.split()[-1]
            break
    assert url, "forkbox serve did not start"
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    os.environ["FORKBOX_URL"] = url
    yield url
    proc.terminate()
    proc.wait(timeout=30)
