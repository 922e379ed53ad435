"""Times `print(1)` execute round trips on a local Jupyter kernel (ipykernel, driven by
jupyter_client), the reference forkbox's run_code is compared with in `make bench`.
Prints a JSON list of milliseconds, one per sample, after 3 warm-up calls."""
import json
import sys
import time

from jupyter_client.manager import start_new_kernel


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def run(code):
            msg_id = kc.execute(code)
            saw_output = False
            while True:
                m = kc.get_iopub_msg(timeout=30)
                if m["parent_header"].get("msg_id") != msg_id:
                    continue
                if m["msg_type"] == "stream":
                    saw_output = True
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    break
            reply = kc.get_shell_msg(timeout=30)
            if reply["content"]["status"] != "ok" or not saw_output:
                raise SystemExit("jupyter execute failed: %r" % reply["content"])

        for _ in range(3):
            run("print(1)")
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            run("print(1)")
            samples.append((time.perf_counter() - t) * 1000)
        print(json.dumps(samples))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
