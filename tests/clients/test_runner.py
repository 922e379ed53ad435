"""Seed 003's `RunnerClient` examples, Python and JavaScript, as the seed prints them
(the one change: the URL they are given, forkbox's instead of localhost:8080), and the
seed's raw requests, against a real `forkbox serve`."""
import os
import subprocess
import tempfile

import requests

from marks import calls  # noqa: E402

URL = os.environ["FORKBOX_TEST_URL"]

# Seed 003, "Python SDK", as printed.
PYTHON_CLIENT = '''
import requests

class RunnerClient:
    def __init__(self, url="http://localhost:8080"):
        self.url = url

    def execute(self, language, code, timeout=30):
        response = requests.post(
            f"{self.url}/api/v1/execute",
            json={"language": language, "code": code, "timeout": timeout}
        )
        return response.json()
'''

# Seed 003, "JavaScript SDK", as printed, and its usage (top-level await: an ES module).
JS_CLIENT = '''
class RunnerClient {
  constructor(url = "http://localhost:8080") {
    this.url = url;
  }

  async execute(language, code, timeout = 30) {
    const res = await fetch(`${this.url}/api/v1/execute`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ language, code, timeout })
    });
    return res.json();
  }
}

// Usage
const client = new RunnerClient(process.env.RUNNER_URL);
const result = await client.execute("nodejs", "console.log(2 ** 10)");
console.log(result.stdout); // 1024
'''


@calls("seed 003 Python `RunnerClient.execute` as printed (python, nodejs, an error, a timeout)")
def test_python_runner_client():
    ns = {}
    exec(PYTHON_CLIENT, ns)
    client = ns["RunnerClient"](URL)
    result = client.execute("python", "print(2 ** 10)")
    assert result["stdout"] == "1024\n" and result["exit_code"] == 0, result
    assert result["load_time"].endswith("ms") and result["exec_time"].endswith("ms")
    result = client.execute("nodejs", "console.log(Array.from({length:10},(_,i)=>i*i))")
    assert "81" in result["stdout"] and result["exit_code"] == 0, result
    result = client.execute("python", "import sys; print('no', file=sys.stderr); sys.exit(3)")
    assert (result["stderr"], result["exit_code"]) == ("no\n", 3), result
    result = client.execute("ruby2", "puts 1")
    assert result == {"error": "language not found: ruby2", "code": "language_not_found"}, result
    result = client.execute("python", "import time; time.sleep(10)", timeout=1)
    assert result["exit_code"] != 0, result


@calls("seed 003 JavaScript `RunnerClient` as printed (node's fetch)")
def test_javascript_runner_client():
    with tempfile.NamedTemporaryFile("w", suffix=".mjs", delete=False) as f:
        f.write(JS_CLIENT)
    try:
        out = subprocess.run(
            ["node", f.name], env={**os.environ, "RUNNER_URL": URL},
            capture_output=True, text=True, timeout=120,
        )
    finally:
        os.unlink(f.name)
    assert (out.stdout, out.returncode) == ("1024\n\n", 0), out.stderr


@calls("seed 003 raw requests: `/health`, `/api/v1/languages[/:lang]`, `/api/v1/rootfs`, `/api/v1/snapshots`, `{\"error\"}` answers")
def test_raw_seed_requests():
    health = requests.get(f"{URL}/health").json()
    assert health["status"] == "healthy" and health["version"]
    langs = requests.get(f"{URL}/api/v1/languages").json()
    names = [l["name"] for l in langs["languages"]]
    assert {"python", "nodejs", "go", "rust"} <= set(names) and langs["count"] == len(names)
    assert {"name": "python", "extension": ".py"}.items() <= next(
        l for l in langs["languages"] if l["name"] == "python").items()
    one = requests.get(f"{URL}/api/v1/languages/python").json()
    assert one["name"] == "python"
    r = requests.get(f"{URL}/api/v1/languages/ruby2")
    assert r.status_code == 404 and r.json()["error"] == "language not found: ruby2"
    rootfs = requests.get(f"{URL}/api/v1/rootfs").json()["rootfs"]
    assert any(r["language"] == "python" for r in rootfs), rootfs
    assert "snapshots" in requests.get(f"{URL}/api/v1/snapshots").json()
