"""Open-loop lookup timelines from a lab pod: what a pod sees while the cache or agent fails.

Shared by the node-local, cache-health and node-lock tests (formerly in test_nodelocal.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

from dnsguard.testing.lab import Lab

# Open-loop sampling: a new lookup starts every `gap` seconds whatever the others are doing, so
# lookups stuck in a resolver retry cannot hide what lookups started meanwhile would see.
TIMELINE = r"""
import json, socket, sys, threading, time
name, seconds, gap = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
out = []
def one():
    t = time.monotonic()
    try:
        socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        ok = True
    except OSError:
        ok = False
    out.append((t, time.monotonic(), ok))
threads = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    th = threading.Thread(target=one)
    th.start()
    threads.append(th)
    time.sleep(gap)
for th in threads:
    th.join()
print(json.dumps(sorted(out)))
"""


class Timeline:
    """Back-to-back getaddrinfo lookups from one pod, each recorded as (start, end, ok)."""

    def __init__(self, lab: Lab, pod: int, seconds: float, gap: float = 0.05) -> None:
        self.proc = lab.popen_in(
            lab.pod_netns[pod], [sys.executable, "-c", TIMELINE, "svc-1", str(seconds), str(gap)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.seconds = seconds

    def result(self) -> list[tuple[float, float, bool]]:
        out, err = self.proc.communicate(timeout=self.seconds + 30)
        assert self.proc.returncode == 0, err
        return [tuple(x) for x in json.loads(out)]

    @staticmethod
    def recovery(samples: list[tuple[float, float, bool]], since: float) -> tuple[float, float]:
        """(recovery, worst in-flight): seconds from ``since`` until every lookup started from
        then on succeeded in under 1 s, and the longest lookup started before that point.

        Lookups already waiting on the dead cache can only be rescued by the resolver's own
        retry (glibc: 5 s), so they are reported apart from new lookups.
        """
        recovered_at = since
        for start, end, ok in samples:
            if start >= since - 1 and (not ok or end - start >= 1.0):
                recovered_at = max(recovered_at, start + 1e-6)
        caught = [end - start for start, end, _ in samples if since - 1 <= start < recovered_at]
        return recovered_at - since, max(caught, default=0.0)
