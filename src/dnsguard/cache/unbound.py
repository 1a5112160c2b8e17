"""Supervise unbound: config written atomically, started in the foreground, reloaded in place.

unbound runs as our child with a parent-death signal, so it never outlives the agent (a killed
agent pod must not leave a cache that nobody supervises; the dead man's switch has already
turned interception off by then). Its log goes to a file in the state directory whose tail is
quoted when it exits, so "address in use" reaches the operator verbatim.

A new config (CoreDNS endpoints changed) is applied with ``unbound-control reload_keep_cache``:
a plain ``reload`` empties the cache, and since every node sees an EndpointSlice change at the
same moment, every node would then ask CoreDNS for everything at once, during CoreDNS's own
rollout. unbound keeps the cache only while its sizes and thread count stay the same (it says
"ok" and drops the cache silently otherwise), so those are compared first and a change there
gets a full reload, logged with the reason; so does a reload_keep_cache that fails.

The log is capped (`LOG_CAP`; it sits in a small emptyDir in the pod): a thread beside the exit
watcher checks it every `LOG_CHECK_SECONDS` and moves its tail to ``unbound.log.1``. unbound
writes through the O_APPEND descriptor it inherited from us, so after the file is truncated its
next line lands at offset 0: no hole, no restart, no signal to unbound.

Privileges: unbound parses every pod's packets, so it must not keep root. It starts as root
(binding port 53 and forcing its 8 MiB socket buffers need NET_BIND_SERVICE and NET_ADMIN),
then switches to the ``unbound`` user with no capabilities (``username:`` in its config).
What that changes, each checked with the real unbound (tests/integration/test_cache_hardening):

* ``reload`` and ``reload_keep_cache`` keep the listening sockets, so they still work; but a
  *new* listen address cannot be bound any more (unbound reports success and simply does not
  listen there). A config whose ``interface:`` lines changed is therefore applied by a restart.
* The agent, root without CAP_KILL, may not signal a process of another uid: the pod grants
  KILL for that; without it `stop` asks unbound to stop through its control socket.
* The kernel clears the parent-death signal when unbound changes its uid. In the pod the agent
  is PID 1 of the container, and the kernel kills every other process when it dies; outside a
  pod, an agent killed with SIGKILL leaves its unbound running (a clean stop never does).
* unbound re-reads its config as that user on reload, and changes into the state directory:
  every directory up to the state directory must be searchable by others. Where it is not (or
  the user is missing, or the agent is not root) unbound keeps the agent's user, with a
  warning, rather than failing to start: DNS first.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dnsguard.netfilter.errors import NetfilterError
from dnsguard.plan.cache import CACHE_USER

__all__ = ["CacheError", "Unbound"]

log = logging.getLogger("dnsguard.cache")

#: unbound.log is cut back to nothing past this size, its last LOG_CAP bytes kept in .1
LOG_CAP = 1 << 20
LOG_CHECK_SECONDS = 1.0


class CacheError(NetfilterError):
    reason = "cache"


def _die_with_parent() -> list[str]:
    """setpriv sets the parent-death signal then execs: safe in a threaded agent."""
    return ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


#: Settings a cache survives ``reload_keep_cache`` only while they stay the same.
_CACHE_SHAPE = ("msg-cache-size:", "rrset-cache-size:", "msg-cache-slabs:",
                "rrset-cache-slabs:", "num-threads:")


def _cache_shape(text: str) -> tuple[str, ...]:
    return tuple(sorted(ln.strip() for ln in text.splitlines()
                        if ln.strip().startswith(_CACHE_SHAPE)))


_INTERFACES = re.compile(r"^\s*interface:.*$", re.M)
_USERNAME = re.compile(r'^(\s*username: )"[^"\n]*"$', re.M)


def privilege_drop_blocker(state_dir: Path, user: str = CACHE_USER) -> str | None:
    """Why unbound could not run as ``user`` with its files in ``state_dir``; None if it can."""
    if os.geteuid() != 0:
        return "the agent is not root"
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} (install Debian's unbound package)"
    for d in [state_dir.resolve(), *state_dir.resolve().parents]:
        try:
            mode = d.stat().st_mode
        except OSError:
            continue  # created later by the agent, with the default (searchable) mode
        if not mode & stat.S_IXOTH:
            return f"{d} is not searchable by others (mode {stat.S_IMODE(mode):o})"
    return None


class Unbound:
    def __init__(self, state_dir: Path, binary: str = "unbound") -> None:
        self.state_dir = state_dir
        self.binary = binary
        #: called from a watcher thread the moment the process exits
        self.on_exit: Callable[[], None] | None = None
        self.conf = state_dir / "unbound.conf"
        self.logfile = state_dir / "unbound.log"
        self.rotated_log = state_dir / "unbound.log.1"
        self.log_cap = LOG_CAP
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        #: the cache shape of the config the running process last loaded
        self._loaded_shape: tuple[str, ...] | None = None
        #: set by `write_config` when the listen addresses changed: a reload cannot bind them
        self.restart_needed = False
        self._warned_root = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _tool(self, suffix: str) -> str:
        """unbound-checkconf / unbound-control next to the configured unbound."""
        return f"{self.binary}-{suffix}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self, text: str) -> bool:
        """Validate and atomically install ``text``; True when it differs from the current file."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        text = self._with_runnable_user(text)
        old = self.conf.read_text() if self.conf.exists() else None
        if old == text:
            return False
        tmp = self.conf.with_name(f".{self.conf.name}.{os.getpid()}")
        tmp.write_text(text)
        try:
            res = subprocess.run([self._tool("checkconf"), str(tmp)], capture_output=True,
                                 text=True, timeout=30, check=False)
        except FileNotFoundError:
            tmp.unlink()
            raise CacheError(f"{self.binary}-checkconf not found: install unbound") from None
        if res.returncode != 0:
            tmp.unlink()
            raise CacheError(f"unbound rejected its config: {(res.stderr or res.stdout).strip()}")
        tmp.replace(self.conf)
        if old is not None and _INTERFACES.findall(old) != _INTERFACES.findall(text):
            self.restart_needed = True
        return True

    def _with_runnable_user(self, text: str) -> str:
        """``text``, with ``username: ""`` instead where unbound could not drop to its user."""
        if (why := privilege_drop_blocker(self.state_dir)) is None:
            return text
        if not self._warned_root:
            log.warning("unbound keeps running as the agent's user: %s", why)
            self._warned_root = True
        return _USERNAME.sub(r'\1""', text)

    def start(self) -> None:
        if self.running():
            return
        if shutil.which(self.binary) is None:
            raise CacheError(f"{self.binary} not found: install unbound")
        self._stopping = False
        self.restart_needed = False
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self._cap_log_quietly()  # an earlier run's log
        self._loaded_shape = _cache_shape(self.conf.read_text()) if self.conf.exists() else None
        with self.logfile.open("ab") as out:
            try:
                self.proc = subprocess.Popen(
                    [*_die_with_parent(), self.binary, "-d", "-c", str(self.conf)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
            except FileNotFoundError:
                raise CacheError(f"{self.binary} not found: install unbound") from None
        log.info("started unbound, pid %d", self.proc.pid)
        exited = threading.Event()
        threading.Thread(target=self._watch, args=(self.proc, exited), daemon=True,
                         name=f"unbound-{self.proc.pid}").start()
        threading.Thread(target=self._cap_log_loop, args=(exited,), daemon=True,
                         name=f"unbound-log-{self.proc.pid}").start()

    def _watch(self, proc: subprocess.Popen[bytes], exited: threading.Event) -> None:
        proc.wait()
        exited.set()
        # only for the current process: after a restart the old one's exit is expected
        if self.on_exit is not None and not self._stopping and self.proc is proc:
            self.on_exit()

    def _cap_log_loop(self, exited: threading.Event) -> None:
        while not exited.wait(LOG_CHECK_SECONDS):
            self._cap_log_quietly()

    def _cap_log_quietly(self) -> None:
        """A full or vanished state dir must neither stop the cache nor end the loop."""
        try:
            self.cap_log()
        except OSError as exc:
            log.warning("cannot cap %s: %s", self.logfile, exc)

    def cap_log(self) -> bool:
        """Past `log_cap`: keep the last `log_cap` bytes (whole lines) in unbound.log.1 and
        empty unbound.log; True when it did. Lines unbound writes between the copy and the
        truncate (microseconds) are lost."""
        try:
            size = self.logfile.stat().st_size
        except FileNotFoundError:
            return False
        if size <= self.log_cap:
            return False
        with self.logfile.open("rb") as f:
            f.seek(size - self.log_cap)
            tail = f.read(self.log_cap)
        cut = tail.find(b"\n")  # the first line is a partial one
        self.rotated_log.write_bytes(tail[cut + 1:] if 0 <= cut < len(tail) - 1 else tail)
        os.truncate(self.logfile, 0)
        return True

    def exit_reason(self) -> str:
        """Why the process is not running, from its exit code and the tail of its log."""
        code = self.proc.poll() if self.proc is not None else None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else \
            f"exited with status {code}"
        tail = ""
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
            errors = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
            tail = errors[-1].strip() if errors else ""
        except OSError:
            pass
        return f"unbound {how}" + (f": {tail}" if tail else "")

    def reload(self) -> str:
        """Re-read the config without a restart (same PID), keeping the cache when unbound can.

        Returns how: ``"kept the cache"`` or ``"full reload (...)"`` with the reason.
        """
        if self.restart_needed and self.running():
            log.info("unbound's listen addresses changed: restarting it (it binds as root only "
                     "at start)")
            self.stop()
            self.start()
            return "restarted (listen addresses changed)"
        shape = _cache_shape(self.conf.read_text())
        why = ""
        if self._loaded_shape is not None and shape != self._loaded_shape:
            why = "cache size or threads changed, which reload_keep_cache cannot keep"
        else:
            res = self._control("reload_keep_cache")
            if res.returncode == 0 and not res.stdout.startswith("error"):
                self._loaded_shape = shape
                log.info("unbound reloaded its config and kept its cache")
                return "kept the cache"
            why = f"reload_keep_cache failed: {(res.stderr or res.stdout).strip()}"
        res = self._control("reload")
        if res.returncode != 0:
            raise CacheError(f"unbound-control reload failed: {(res.stderr or res.stdout).strip()}")
        self._loaded_shape = shape
        log.warning("unbound reloaded its config and flushed its cache: %s", why)
        return f"full reload ({why})"

    def forget_down_upstreams(self) -> None:
        """``flush_infra all``: unbound stops treating upstreams as down (after an outage it
        keeps them so for up to infra-host-ttl, serving stale answers or SERVFAIL meanwhile)."""
        res = self._control("flush_infra", "all")
        if res.returncode != 0 or res.stdout.startswith("error"):
            log.warning("unbound-control flush_infra failed: %s",
                        (res.stderr or res.stdout).strip())

    def _control(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._tool("control"), "-c", str(self.conf), *command],
                              capture_output=True, text=True, timeout=30, check=False)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; only the process we started."""
        if self.proc is None:
            return
        self._stopping = True
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
            except PermissionError:  # no CAP_KILL for unbound's uid: ask it over its socket
                self._control_stop()
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is None:
                try:
                    self.proc.kill()
                except PermissionError:
                    log.error("cannot kill unbound (pid %d, another uid): the pod needs the "
                              "KILL capability", self.proc.pid)
                    self.proc = None
                    return
                self.proc.wait()
        self.proc = None

    def _control_stop(self) -> None:
        res = self._control("stop")
        if res.returncode != 0:
            log.warning("unbound-control stop failed: %s", (res.stderr or res.stdout).strip())
