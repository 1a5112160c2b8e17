"""Run `FakeApiServer` in this process, driven by JSON lines on stdin.

The agent under test runs inside a lab node's network namespace, where the test process's
127.0.0.1 is out of reach; so the fake API server runs in that namespace too, as this child
process. Each stdin line is ``{"op": METHOD, "args": [...], "kw": {...}}``; each is answered
with one line, ``ok`` or ``error: ...``. The kubeconfig is written to argv[1] before the first
``ok``.
"""

import json
import sys
from pathlib import Path

from dnsguard.testing.fake_apiserver import FakeApiServer


def main() -> None:
    with FakeApiServer(bookmark_interval=0.5) as server:
        server.write_kubeconfig(Path(sys.argv[1]))
        print("ok", flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                getattr(server, cmd["op"])(*cmd.get("args", []), **cmd.get("kw", {}))
                print("ok", flush=True)
            except Exception as exc:  # report, keep serving
                print(f"error: {exc}", flush=True)


if __name__ == "__main__":
    main()
