"""The node lock (node/lock.py) and how the commands use it: one agent per node.

Two holders in one process (flock locks belong to open file descriptions, so two opens in one
process contend exactly as two processes do), real child processes for holder naming and for
release on SIGKILL, and the CLI refusing, forcing and waiting. What this cannot prove: that a
hostPath gives two pods the same inode (the kernel test and the manifests' test cover the rest).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dnsguard import cli
from dnsguard.cli import main
from dnsguard.config import ConfigError, settings_from
from dnsguard.node.lock import Holder, LockHeld, NodeLock
from dnsguard.testing.fakes import FakeRunner

# A holder in its own process: takes the lock, says so, then waits for stdin to close. With
# "spawn" it also starts a grandchild that inherits every descriptor it can (close_fds=False).
CHILD = r"""
import subprocess, sys
from pathlib import Path
from dnsguard.node.lock import NodeLock
lock = NodeLock(Path(sys.argv[1]), "run", env={"POD_NAME": "dnsguard-child"})
assert lock.try_acquire()
if sys.argv[2:] == ["spawn"]:
    kid = subprocess.Popen(["sleep", "60"], close_fds=False)
    print(kid.pid, flush=True)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "agent.lock"


def _child(path: Path, *extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    while (line := proc.stdout.readline().strip()) != "locked":
        assert line, "the child exited before taking the lock"
        lines.append(line)
    return proc, lines


def test_second_holder_is_refused_until_the_first_releases(path: Path) -> None:
    path.parent.mkdir()
    path.write_text("left by an older holder")
    path.chmod(0o644)
    a, b = NodeLock(path, "run"), NodeLock(path, "cleanup")
    assert a.try_acquire() and a.held
    assert not b.try_acquire() and not b.held
    assert b.holder() == Holder.decode(path.read_bytes())
    holder = b.holder()
    assert holder is not None and (holder.pid, holder.command) == (os.getpid(), "run")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # nobody else can open it to lock it
    a.release()
    assert path.exists(), "the lock file must stay: unlinking it splits the lock in two"
    assert b.try_acquire()
    assert b.holder() is not None and b.holder().command == "cleanup"  # type: ignore[union-attr]
    assert not a.try_acquire()
    b.release()


def test_holder_in_another_process_is_named_and_released_when_killed(path: Path) -> None:
    proc, _ = _child(path)
    try:
        mine = NodeLock(path, "apply")
        assert not mine.try_acquire()
        holder = mine.holder()
        assert holder is not None
        assert (holder.pid, holder.command, holder.pod) == (proc.pid, "run", "dnsguard-child")
        refusal = str(LockHeld(path, holder))
        assert f"pid {proc.pid}" in refusal and "pod dnsguard-child" in refusal
        assert "since 20" in refusal and "UTC" in refusal and "\n" not in refusal
        proc.kill()  # SIGKILL: no handler, no release; only the kernel can free the lock
        proc.wait(timeout=10)
        assert mine.try_acquire()
        mine.release()
    finally:
        proc.kill()
        proc.communicate()


def test_a_child_of_the_holder_does_not_keep_the_lock(path: Path) -> None:
    """unbound, started by the agent, must not hold the node after the agent was killed."""
    proc, lines = _child(path, "spawn")
    grandchild = int(lines[0])
    try:
        proc.kill()
        proc.wait(timeout=10)
        assert Path(f"/proc/{grandchild}").exists()  # still alive, descriptors and all
        mine = NodeLock(path, "run")
        assert mine.try_acquire()
        mine.release()
    finally:
        os.kill(grandchild, signal.SIGKILL)
        proc.communicate()


def test_a_clean_exit_of_the_holder_releases_too(path: Path) -> None:
    proc, _ = _child(path)
    proc.communicate("")  # stdin closed: the child returns normally
    assert proc.returncode == 0
    assert NodeLock(path, "run").try_acquire()


class CountingStop(threading.Event):
    """A stop event that is set after ``polls`` waits: bounds a wait loop without sleeping."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.polls = polls
        self.calls = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.calls += 1
        if self.calls >= self.polls:
            self.set()
        return self.is_set()


def test_wait_tells_the_holder_once_and_gives_up_when_stopped(path: Path) -> None:
    a, b = NodeLock(path, "run"), NodeLock(path, "run")
    assert a.try_acquire()
    heard: list[Holder | None] = []
    stop = CountingStop(polls=5)
    assert b.wait(stop, heard.append) is False
    assert stop.calls == 5 and not b.held
    assert len(heard) == 1 and heard[0] is not None and heard[0].pid == os.getpid()
    a.release()


def test_wait_takes_the_lock_as_soon_as_the_holder_lets_go(path: Path) -> None:
    a, b = NodeLock(path, "run"), NodeLock(path, "run")
    assert a.try_acquire()
    stop = CountingStop(polls=1000)
    assert b.wait(stop, lambda holder: a.release()) is True
    assert b.held and stop.calls == 1  # one poll after the release, not a timeout later
    b.release()


def test_holder_record_round_trips_and_garbage_is_no_holder() -> None:
    h = Holder.me("run", env={"POD_NAME": "dnsguard-x7k2p"})
    assert Holder.decode(h.encode()) == h
    assert "pod dnsguard-x7k2p" in h.describe() and f"pid {os.getpid()}" in h.describe()
    assert "pod" not in Holder.me("run", env={}).describe()
    for data in (b"", b"4242\n", b"{}", b'{"pid": "x"}', b"\xff"):
        assert Holder.decode(data) is None, data


@pytest.mark.parametrize("raw", ["agent.lock", "run/agent.lock", "/run/dnsguard/", "/run/..",
                                 "/"])
def test_lock_file_flag_must_be_an_absolute_file_path(raw: str) -> None:
    with pytest.raises(ConfigError, match="invalid --lock-file"):
        settings_from(cli.build_parser().parse_args(["run", "--lock-file", raw]), env={})
    with pytest.raises(ConfigError, match="invalid --lock-file"):
        settings_from(cli.build_parser().parse_args(["run"]), env={"DNSGUARD_LOCK_FILE": raw})


def test_lock_file_from_env_and_force_from_the_flag_only() -> None:
    parse = cli.build_parser().parse_args
    assert settings_from(parse(["run"]), env={}).lock_file == Path("/run/dnsguard/agent.lock")
    s = settings_from(parse(["cleanup"]), env={"DNSGUARD_LOCK_FILE": "/x/l",
                                               "DNSGUARD_FORCE": "true"})
    assert s.lock_file == Path("/x/l") and s.force is False
    assert settings_from(parse(["cleanup", "--force"]), env={}).force is True
    with pytest.raises(SystemExit):
        parse(["run", "--force"])  # run waits; it has nothing to force


# -- the commands ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _logs_to_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() would point the dnsguard logger at stderr alone; keep it visible to caplog."""
    monkeypatch.setattr(cli, "setup_logging", lambda fmt: None)
    monkeypatch.setattr(logging.getLogger("dnsguard"), "propagate", True)
    logging.getLogger("dnsguard").setLevel(logging.INFO)


@pytest.mark.parametrize("command", ["apply", "cleanup"])
def test_apply_and_cleanup_refuse_while_held_and_change_nothing(
        command: str, path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "status.json").write_text("{}")
    agent = NodeLock(path, "run")
    assert agent.try_acquire()
    runner = FakeRunner()
    rc = main([command, "--lock-file", str(path), "--state-dir", str(tmp_path)], runner=runner)
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and runner.calls == []
    assert (tmp_path / "status.json").exists()
    assert len(err) == 1 and err[0].startswith("dnsguard: error: the node lock")
    assert f"dnsguard run (pid {os.getpid()}" in err[0] and "--force" in err[0]
    agent.release()


def test_cleanup_force_goes_ahead_while_held(path: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    agent = NodeLock(path, "run")
    assert agent.try_acquire()
    runner = FakeRunner()
    main(["cleanup", "--force", "--lock-file", str(path), "--state-dir", str(tmp_path)],
         runner=runner)
    assert runner.calls, "cleanup --force did not run"
    assert "--force: going ahead although the node lock" in caplog.text
    assert agent.held and not NodeLock(path, "x").try_acquire()  # forcing takes nothing
    agent.release()


def test_cleanup_holds_the_lock_while_it_works_and_lets_go_after(path: Path,
                                                                 tmp_path: Path) -> None:
    seen: list[bool] = []

    class Probe(FakeRunner):
        def run(self, argv, *, stdin=None, timeout=30.0):  # type: ignore[no-untyped-def]
            other = NodeLock(path, "run")
            seen.append(other.try_acquire())
            other.release()
            return super().run(argv, stdin=stdin, timeout=timeout)

    main(["cleanup", "--lock-file", str(path), "--state-dir", str(tmp_path)], runner=Probe())
    assert seen and not any(seen)
    assert NodeLock(path, "run").try_acquire()


def test_plan_and_status_never_take_the_lock(path: Path) -> None:
    for command in ("plan", "status"):
        with cli._node_lock(command, settings_from(
                cli.build_parser().parse_args([command, "--lock-file", str(path)]), env={})) as go:
            assert go is True
    assert not path.exists()


def test_run_sigterm_while_waiting_exits_0_and_touches_nothing(
        path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = NodeLock(path, "run")
    assert agent.try_acquire()

    class SigtermWhenWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for the node lock"):
                os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread

    handler = SigtermWhenWaiting()
    logging.getLogger("dnsguard").addHandler(handler)
    before = signal.getsignal(signal.SIGTERM)
    runner = FakeRunner()
    # a bug here must fail the test, not hang it: after 30 s the holder lets go instead
    guard = threading.Timer(30, agent.release)
    guard.start()
    try:
        rc = main(["run", "--lock-file", str(path), "--state-dir", str(tmp_path / "state")],
                  runner=runner)
    finally:
        guard.cancel()
        logging.getLogger("dnsguard").removeHandler(handler)
    assert rc == 0 and runner.calls == []
    assert not (tmp_path / "state").exists()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "received SIGTERM while waiting for the node lock" in caplog.text
    waiting = [r for r in caplog.records if r.getMessage().startswith("waiting for the node")]
    assert len(waiting) == 1 and f"pid {os.getpid()}" in waiting[0].getMessage()
    assert agent.held
    agent.release()


@pytest.mark.parametrize("command", ["run", "apply", "cleanup"])
def test_the_lock_is_held_before_the_command_changes_anything_and_freed_after(
        command: str, path: Path) -> None:
    """Ordering: taken before the command's first step, released after its last, even when
    the command fails (a failed start must not keep the next agent waiting)."""
    seen: list[bool] = []

    def body(args: object, settings: object, runner: object) -> int:
        other = NodeLock(path, "x")
        seen.append(other.try_acquire())
        other.release()
        raise RuntimeError("the command failed half-way")

    args = cli.build_parser().parse_args([command, "--lock-file", str(path)])
    with pytest.raises(RuntimeError):
        cli._locked(body)(args, settings_from(args, env={}), FakeRunner())
    assert seen == [False]
    assert NodeLock(path, "x").try_acquire()
