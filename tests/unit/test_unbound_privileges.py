"""The unbound supervisor's privilege handling, with stand-in binaries (no root, no network).

What this proves: unbound is told to drop to its user only where the drop can work; a config
whose listen addresses changed is applied by a restart (a new PID), other changes by a reload;
a stop that may not signal unbound's uid asks it over its control socket. What it cannot prove:
that the real unbound drops privileges, keeps its sockets over a reload and cannot bind a new
address afterwards; tests/integration/test_cache_hardening.py shows those with the real one.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dnsguard.cache import unbound as unbound_mod
from dnsguard.cache.unbound import Unbound, privilege_drop_blocker

CONF = """server:
    username: "unbound"
    interface: {addr}@53
    verbosity: 0
"""


def fake_unbound(tmp_path: Path) -> str:
    """``fakeub`` sleeps like a daemon; checkconf accepts; control records its commands."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "fakeub").write_text("#!/bin/sh\nexec sleep 60\n")
    (bindir / "fakeub-checkconf").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "fakeub-control").write_text(
        f"#!/bin/sh\necho \"$@\" >> {tmp_path}/control.log\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    return str(bindir / "fakeub")


@pytest.fixture
def ub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unbound_mod, "privilege_drop_blocker", lambda d: None)
    u = Unbound(tmp_path / "state", binary=fake_unbound(tmp_path))
    yield u
    u.stop(timeout=1)


def test_listen_address_changes_restart_unbound_other_changes_reload(
        ub: Unbound, tmp_path: Path) -> None:
    assert ub.write_config(CONF.format(addr="198.18.1.10"))
    ub.start()
    first = ub.pid
    # an upstream change: a reload, same process
    assert ub.write_config(CONF.format(addr="198.18.1.10") + "    prefetch: yes\n")
    assert not ub.restart_needed
    ub.reload()
    assert ub.pid == first
    # an upstream change keeps the cache (see cache.unbound: reload_keep_cache)
    assert (tmp_path / "control.log").read_text().split()[-1] == "reload_keep_cache"
    # a new listen address: unbound, no longer root, could not bind it on a reload
    assert ub.write_config(CONF.format(addr="198.18.1.11"))
    assert ub.restart_needed
    ub.reload()
    assert ub.running() and ub.pid != first
    assert not ub.restart_needed
    assert (tmp_path / "control.log").read_text().count("reload") == 1  # no reload: a restart


def test_a_restart_does_not_report_the_old_process_as_a_crash(ub: Unbound) -> None:
    exits: list[int | None] = []
    ub.on_exit = lambda: exits.append(ub.pid)
    ub.write_config(CONF.format(addr="198.18.1.10"))
    ub.start()
    old = ub.proc
    assert old is not None
    ub.write_config(CONF.format(addr="198.18.1.11"))
    ub.reload()
    assert ub.proc is not old and ub.running()
    # the old process's exit watcher waking only now, after the new one started (a race the
    # scheduler decides): it must not report a crash, which would fail the cache open
    ub._watch(old, threading.Event())
    assert exits == []


def test_the_user_is_dropped_to_only_where_it_can_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ub = Unbound(tmp_path / "state", binary=fake_unbound(tmp_path))
    monkeypatch.setattr(unbound_mod, "privilege_drop_blocker", lambda d: "no user 'unbound'")
    ub.write_config(CONF.format(addr="198.18.1.10"))
    assert 'username: ""' in ub.conf.read_text()
    monkeypatch.setattr(unbound_mod, "privilege_drop_blocker", lambda d: None)
    ub.write_config(CONF.format(addr="198.18.1.10"))
    assert 'username: "unbound"' in ub.conf.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="the check answers 'not root' first")
def test_a_state_dir_others_cannot_search_blocks_the_drop(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "state").mkdir(parents=True)
    closed.chmod(0o700)
    assert "is not searchable by others (mode 700)" in str(
        privilege_drop_blocker(closed / "state"))
    assert "no user" in str(privilege_drop_blocker(Path("/"), user="no-such-user-here"))
    opened = Path("/tmp")
    assert stat.S_IMODE(opened.stat().st_mode) & stat.S_IXOTH
    assert privilege_drop_blocker(opened / "dnsguard-not-created-yet") is None


def test_stop_asks_over_the_control_socket_when_it_may_not_signal(
        ub: Unbound, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ub.write_config(CONF.format(addr="198.18.1.10"))
    ub.start()
    proc = ub.proc
    assert proc is not None

    def no_cap_kill() -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(proc, "terminate", no_cap_kill)
    real_kill = proc.kill
    monkeypatch.setattr(proc, "kill", no_cap_kill)
    ub.stop(timeout=0.2)
    assert (tmp_path / "control.log").read_text().split()[-1] == "stop"
    assert ub.proc is None
    real_kill()  # the stand-in ignores `stop`; the test process may signal it
    proc.wait()
