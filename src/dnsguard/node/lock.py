"""One agent per node: an exclusive ``flock`` on a file that every dnsguard on the node shares.

Why a lock: two dnsguards that change the node at once undo each other. A DaemonSet rollout
with ``maxSurge`` starts the new agent beside the old one, whose teardown then removes the
link ``dnsguard0`` and the rules the new one just installed (DNS black-holes until someone
notices); a manual ``dnsguard run`` or ``dnsguard cleanup`` beside the agent does the same. So
``run`` holds this lock for its whole life and a second ``run`` waits for it; ``apply`` and
``cleanup`` refuse while it is held (unless forced); ``plan`` and ``status`` never touch it.

Why ``flock`` on a file: the kernel releases it when the holder's last descriptor closes,
including on SIGKILL or an OOM kill, so a dead holder never blocks the node (no stale-PID
guessing). The descriptor is close-on-exec: unbound, started by the agent, must not inherit
the lock and keep it after the agent died. The file lives on a hostPath (every pod on the node
sees the same inode) and is never removed: unlinking a lock file lets a newcomer lock a fresh
inode while the old holder still holds the unlinked one. For the same reason a holder checks,
once locked, that the path still names the inode it locked, and retries otherwise.

The holder writes who it is into the file (`Holder`: PID, command, host, pod, since when) so
the one refused or waiting can name it. The content is only a description: whether the lock
is held is asked of the kernel, never read from the file (a dead holder's text stays behind).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["Holder", "LockHeld", "NodeLock"]

#: how often a waiting `run` asks the kernel again: the longest a hand-over waits after the
#: old holder is gone (one flock call per poll, nothing else)
POLL_SECONDS = 0.1


class LockHeld(Exception):
    """Another dnsguard holds the lock; the message is one line naming it, fit for the user."""

    def __init__(self, path: Path, holder: Holder | None) -> None:
        self.path, self.holder = path, holder
        self.who = holder.describe() if holder is not None else "an unknown holder"
        super().__init__(f"the node lock {path} is held by {self.who}: another dnsguard is "
                         f"running on this node (--force to go ahead anyway)")


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as the holder wrote it; PIDs are in the holder's PID namespace."""

    pid: int
    command: str
    since: float
    host: str
    pod: str = ""

    @classmethod
    def me(cls, command: str, env: Mapping[str, str] | None = None) -> Holder:
        env = os.environ if env is None else env
        return cls(pid=os.getpid(), command=command, since=time.time(),
                   host=socket.gethostname(), pod=env.get("POD_NAME", ""))

    def describe(self) -> str:
        """One line: ``dnsguard run (pid 4242, pod dnsguard-x7k2p, host node-1) since ...``."""
        where = ", ".join(filter(None, [f"pid {self.pid}", self.pod and f"pod {self.pod}",
                                        f"host {self.host}"]))
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"dnsguard {self.command} ({where}) since {since}"

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        """None for anything but a holder record: empty (being written), foreign, corrupt."""
        try:
            doc = json.loads(data)
            return cls(pid=int(doc["pid"]), command=str(doc["command"]),
                       since=float(doc["since"]), host=str(doc["host"]),
                       pod=str(doc.get("pod", "")))
        except (ValueError, TypeError, KeyError):
            return None


class NodeLock:
    """The node-wide lock at ``path``; `try_acquire` or `wait`, then `release` (or exit).

    Raises `OSError` when the file cannot be opened or locked for any reason other than
    another holder (missing parent that cannot be made, a directory, no permission): the
    caller reports that as a bad ``--lock-file``.
    """

    def __init__(self, path: Path, command: str, env: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.command = command
        self._env = env
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting; True when this process now holds it."""
        if self._fd is not None:
            return True
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            if self._same_inode(fd):
                break
            os.close(fd)  # the file was replaced between open and flock: lock the new one
        self._fd = fd  # held from here: release() closes it whatever happens next
        os.fchmod(fd, 0o600)  # a file made by an older holder, or by hand
        os.ftruncate(fd, 0)
        os.pwrite(fd, Holder.me(self.command, self._env).encode(), 0)
        return True

    def wait(self, stop: threading.Event,
             on_wait: Callable[[Holder | None], None] | None = None) -> bool:
        """Block until the lock is ours (True) or ``stop`` is set first (False).

        ``on_wait`` hears the holder once when waiting starts and again whenever it changes
        (the agent logs it), not on every poll.
        """
        told: tuple[Holder | None] | None = None
        while not self.try_acquire():
            holder = self.holder()
            if on_wait is not None and (told is None or told[0] != holder):
                on_wait(holder)
                told = (holder,)
            if stop.wait(POLL_SECONDS):
                return False
        return True

    def holder(self) -> Holder | None:
        """What the file says about its holder; meaningful only while `try_acquire` fails."""
        for _ in range(3):  # a holder truncates, then writes: an empty read is a moment
            try:
                holder = Holder.decode(self.path.read_bytes())
            except OSError:
                return None
            if holder is not None:
                return holder
        return None

    def release(self) -> None:
        """Unlock (the file stays: see the module docstring). Process exit does the same."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> NodeLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _open(self) -> int:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default, spelled out): children must not inherit the lock.
        # 0600: flock needs only a descriptor, even a read-only one, so a file anyone can open
        # is a lock anyone on the node can take, keeping every agent waiting.
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def _same_inode(self, fd: int) -> bool:
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
