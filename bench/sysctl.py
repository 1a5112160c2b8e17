"""Lowering the machine's conntrack limits for the pressure scenarios, and always restoring them.

``nf_conntrack_max`` and ``nf_conntrack_buckets`` are global: writable only from the initial
network namespace, read-only in every other, and they apply to every namespace on the machine,
other people's included. The kernel compares each namespace's *own* entry count against the
global maximum, so lowering it to 4096 hurts any namespace that holds, or soon needs, more
than 4096 entries. Hence, in order:

1. Nothing changes unless the caller was given ``--allow-sysctl``.
2. Before lowering, every network namespace on the machine that is not one of ours is counted
   (one process per namespace, ``/proc/PID/net/stat/nf_conntrack``; named namespaces without
   a process through ``ip netns exec``). The limit is refused unless the *sum* of their entries
   plus a margin stays below it: the sum bounds the largest of them, so this is stricter than
   the kernel needs.
   Fewer buckets are refused unless other namespaces are nearly idle (`BUCKETS_FOREIGN_MAX`
   entries in all): the hash table is shared by every namespace, and once ours is full, chains
   get long enough (kernel 5.15+) for the kernel to refuse new entries of *anyone* whose hash
   lands in a long chain (``chaintoolong``). That is the effect the scenario measures, and it
   must stay ours.
3. While lowered, a monitor thread re-counts them every second and restores the originals at
   once if they come within half the margin of the limit.
4. Restore runs in ``finally`` (the caller also turns SIGTERM/SIGHUP into SystemExit), and a
   watchdog process started before the first write restores them if this process dies without
   doing it (SIGKILL, OOM): it holds the read end of a pipe and acts on EOF without a "done".
   It only writes back values that are still the ones we set, so it never undoes a change
   somebody else made meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ConntrackLimits",
    "Limits",
    "SysctlRefused",
    "foreign_entries",
    "margin_for",
    "refusal",
]

log = logging.getLogger("bench.sysctl")

SYSCTL_DIR = Path("/proc/sys/net/netfilter")
MAX_FILE = SYSCTL_DIR / "nf_conntrack_max"
BUCKETS_FILE = SYSCTL_DIR / "nf_conntrack_buckets"
MONITOR_INTERVAL = 1.0
#: Most entries other namespaces may hold while we shrink the (shared) hash table.
BUCKETS_FOREIGN_MAX = 512


class SysctlRefused(RuntimeError):
    """Lowering the limit now could hurt someone else's namespaces (or was not allowed)."""


@dataclass(frozen=True)
class Limits:
    max: int
    buckets: int


def margin_for(new_max: int) -> int:
    """Entries kept free for other namespaces: a quarter of the new limit, at least 1024."""
    return max(1024, new_max // 4)


def refusal(new_max: int, foreign: int, margin: int, fewer_buckets: bool = False) -> str | None:
    """Why ``new_max`` (and, if ``fewer_buckets``, a smaller hash table) must not be set while
    other namespaces hold ``foreign`` entries."""
    if foreign + margin > new_max:
        return (f"other namespaces hold {foreign} conntrack entries; with a margin of {margin} "
                f"nf_conntrack_max {new_max} could make them drop packets")
    if fewer_buckets and foreign > BUCKETS_FOREIGN_MAX:
        return (f"other namespaces hold {foreign} conntrack entries (more than "
                f"{BUCKETS_FOREIGN_MAX}): someone is active, and a smaller shared hash table "
                "could make their new connections fail (chaintoolong)")
    return None


def _entries_of_pid(pid: str) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/net/stat/nf_conntrack").read_text().split("\n", 2)
        return int(lines[1].split()[0], 16)  # "entries": the namespace's count, on every row
    except (OSError, IndexError, ValueError):
        return None


def foreign_entries(ours: Iterable[int]) -> dict[int, int]:
    """Conntrack entries of every network namespace except ``ours`` (namespace inodes)."""
    skip = set(ours)
    counts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ino = os.stat(f"/proc/{entry.name}/ns/net").st_ino
        except OSError:
            continue
        if ino in skip or ino in counts:
            continue
        n = _entries_of_pid(entry.name)
        if n is not None:
            counts[ino] = n
    netns_dir = Path("/run/netns")
    for f in sorted(netns_dir.iterdir()) if netns_dir.is_dir() else []:
        try:
            ino = f.stat().st_ino
        except OSError:
            continue
        if ino in skip or ino in counts:
            continue
        cp = subprocess.run(["ip", "netns", "exec", f.name, "cat",
                             str(SYSCTL_DIR / "nf_conntrack_count")],
                            capture_output=True, text=True, timeout=10, check=False)
        if cp.returncode == 0 and cp.stdout.strip().isdigit():
            counts[ino] = int(cp.stdout)
    return counts


def read_limits() -> Limits:
    return Limits(int(MAX_FILE.read_text()), int(BUCKETS_FILE.read_text()))


def _write(limits: Limits) -> None:
    # Independent settings: the bucket count only changes how long hash chains get.
    MAX_FILE.write_text(f"{limits.max}\n")
    BUCKETS_FILE.write_text(f"{limits.buckets}\n")


class ConntrackLimits:
    """Context manager owning the global conntrack limits for the duration of a benchmark.

    ``ours`` returns the inodes of the benchmark's own namespaces (excluded from the count of
    other people's entries: our node namespaces fill up on purpose).
    """

    def __init__(self, allowed: bool, ours: Callable[[], Iterable[int]]) -> None:
        self.allowed = allowed
        self.ours = ours
        self.original: Limits | None = None
        self.current: Limits | None = None
        self._watchdog: subprocess.Popen[str] | None = None
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: why the monitor restored the limits early (the scenario's results are then void)
        self.aborted: str | None = None

    def __enter__(self) -> ConntrackLimits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set(self, new_max: int, buckets: int | None) -> Limits:
        """Lower the limits; raises `SysctlRefused` (nothing changed) when that is unsafe."""
        if not self.allowed:
            raise SysctlRefused("needs --allow-sysctl (nf_conntrack_max is global)")
        with self._lock:
            if self.original is None:
                self.original = read_limits()
            margin = margin_for(new_max)
            foreign = sum(foreign_entries(self.ours()).values())
            fewer = buckets is not None and buckets < self.original.buckets
            reason = refusal(new_max, foreign, margin, fewer)
            if reason is not None:
                raise SysctlRefused(reason)
            if self._watchdog is None:
                self._start_watchdog(self.original)
            want = Limits(new_max, buckets if buckets is not None else self.original.buckets)
            self._tell(f"set {want.max} {want.buckets}")
            _write(want)
            self.current = read_limits()
            self.aborted = None
        log.info("conntrack limits lowered to max %d, buckets %d (others hold %d entries)",
                 self.current.max, self.current.buckets, foreign)
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, daemon=True,
                                             name="bench-sysctl-monitor")
            self._monitor.start()
        return self.current

    def wait_quiet(self, new_max: int, buckets: int | None, timeout: float,
                   every: float = 2.0) -> bool:
        """Wait up to ``timeout`` seconds until `set` would be allowed; True if it would."""
        deadline = time.monotonic() + timeout
        original = self.original or read_limits()
        fewer = buckets is not None and buckets < original.buckets
        while True:
            foreign = sum(foreign_entries(self.ours()).values())
            if refusal(new_max, foreign, margin_for(new_max), fewer) is None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(every)

    def restore(self) -> None:
        """Put the original values back (no-op if nothing was changed)."""
        with self._lock:
            if self.original is None or self.current is None:
                return
            _write(self.original)
            self.current = None
            log.info("conntrack limits restored to max %d, buckets %d",
                     self.original.max, self.original.buckets)

    def close(self) -> None:
        self._stop.set()
        try:
            self.restore()
        finally:
            if self._watchdog is not None:
                self._tell("done")
                with contextlib.suppress(OSError):
                    if self._watchdog.stdin is not None:
                        self._watchdog.stdin.close()
                try:
                    self._watchdog.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._watchdog.kill()  # our own child, by its Popen
                    self._watchdog.wait()
                self._watchdog = None

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL):
            current = self.current
            if current is None:
                continue
            try:
                foreign = sum(foreign_entries(self.ours()).values())
            except Exception as exc:  # a failing count must restore, not crash silently
                self.aborted = f"could not count other namespaces' entries: {exc}"
                self.restore()
                continue
            fewer = self.original is not None and current.buckets < self.original.buckets
            if (foreign + margin_for(current.max) // 2 > current.max
                    or (fewer and foreign > 2 * BUCKETS_FOREIGN_MAX)):
                self.aborted = (f"other namespaces reached {foreign} entries under "
                                f"nf_conntrack_max {current.max}, buckets {current.buckets}: "
                                "restored early")
                log.warning("%s", self.aborted)
                self.restore()

    def _start_watchdog(self, original: Limits) -> None:
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "bench.sysctl", str(original.max), str(original.buckets)],
            stdin=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )

    def _tell(self, line: str) -> None:
        if self._watchdog is None or self._watchdog.stdin is None:
            return
        with contextlib.suppress(OSError):
            self._watchdog.stdin.write(line + "\n")
            self._watchdog.stdin.flush()


def watchdog_main(argv: list[str]) -> int:
    """``python -m bench.sysctl MAX BUCKETS``: restore on EOF unless told "done".

    Reads "set MAX BUCKETS" lines (what the benchmark wrote last) and "done". Runs in its own
    session and ignores SIGINT, so a Ctrl-C that kills the benchmark does not kill it first.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    original = Limits(int(argv[0]), int(argv[1]))
    ours: Limits | None = None
    done = False
    for line in sys.stdin:
        parts = line.split()
        if parts[:1] == ["set"] and len(parts) == 3:
            ours = Limits(int(parts[1]), int(parts[2]))
        elif parts == ["done"]:
            done = True
    if done or ours is None:
        return 0
    try:
        now = read_limits()
    except OSError:
        return 1
    if now == ours:  # still what the benchmark set: nobody else changed them since
        _write(original)
        print(f"bench sysctl watchdog: the benchmark died; restored nf_conntrack_max "
              f"{original.max}, buckets {original.buckets}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(watchdog_main(sys.argv[1:]))
