"""Starts a real `forkbox serve` (the one `make test` built) for the SDK tests."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import forkbox_server  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def server():
    proc, url = forkbox_server.start()
    os.environ["FORKBOX_URL"] = url
    yield url
    forkbox_server.stop(proc)
