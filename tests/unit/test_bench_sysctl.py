"""The guard around the global conntrack limits: when lowering is refused, and that the
originals come back (from the benchmark, or from its watchdog when the benchmark died).

Every test points the module at files in a temporary directory; nothing touches /proc/sys.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import bench.sysctl as sysctl
from bench.sysctl import BUCKETS_FOREIGN_MAX, ConntrackLimits, Limits, SysctlRefused, refusal


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    max_file, buckets_file = tmp_path / "nf_conntrack_max", tmp_path / "nf_conntrack_buckets"
    max_file.write_text("262144\n")
    buckets_file.write_text("65536\n")
    monkeypatch.setattr(sysctl, "MAX_FILE", max_file)
    monkeypatch.setattr(sysctl, "BUCKETS_FILE", buckets_file)
    # no watchdog process in unit tests: it would read the real files
    monkeypatch.setattr(ConntrackLimits, "_start_watchdog", lambda self, original: None)
    return tmp_path


def foreign(n: int):
    return lambda ours: {1: n}


def test_refused_when_others_hold_more_than_the_limit_minus_the_margin():
    assert refusal(4096, 3073, 1024) is not None
    assert refusal(4096, 3072, 1024) is None
    assert refusal(16384, 0, 4096) is None


def test_fewer_buckets_need_other_namespaces_to_be_nearly_idle():
    assert refusal(16384, BUCKETS_FOREIGN_MAX, 4096, fewer_buckets=True) is None
    reason = refusal(16384, BUCKETS_FOREIGN_MAX + 1, 4096, fewer_buckets=True)
    assert reason is not None and "chaintoolong" in reason
    assert refusal(16384, BUCKETS_FOREIGN_MAX + 1, 4096, fewer_buckets=False) is None


def test_margin_is_a_quarter_of_the_limit_but_never_below_1024():
    assert sysctl.margin_for(4096) == 1024
    assert sysctl.margin_for(16384) == 4096
    assert sysctl.margin_for(2048) == 1024


def test_nothing_changes_without_permission(fake_proc: Path, monkeypatch):
    monkeypatch.setattr(sysctl, "foreign_entries", foreign(0))
    with ConntrackLimits(False, list) as limits, pytest.raises(SysctlRefused, match="allow"):
        limits.set(4096, 1024)
    assert sysctl.read_limits() == Limits(262144, 65536)


def test_set_then_close_restores_the_originals(fake_proc: Path, monkeypatch):
    monkeypatch.setattr(sysctl, "foreign_entries", foreign(10))
    with ConntrackLimits(True, list) as limits:
        assert limits.set(4096, 1024) == Limits(4096, 1024)
        assert sysctl.read_limits() == Limits(4096, 1024)
        limits.set(16384, None)  # None: the machine's own bucket count
        assert sysctl.read_limits() == Limits(16384, 65536)
    assert sysctl.read_limits() == Limits(262144, 65536)


def test_restore_happens_when_the_body_raises(fake_proc: Path, monkeypatch):
    monkeypatch.setattr(sysctl, "foreign_entries", foreign(0))
    with pytest.raises(KeyboardInterrupt), ConntrackLimits(True, list) as limits:
        limits.set(4096, 1024)
        raise KeyboardInterrupt
    assert sysctl.read_limits() == Limits(262144, 65536)


def test_refusal_changes_nothing(fake_proc: Path, monkeypatch):
    monkeypatch.setattr(sysctl, "foreign_entries", foreign(5000))
    with ConntrackLimits(True, list) as limits, pytest.raises(SysctlRefused):
        limits.set(4096, None)
    assert sysctl.read_limits() == Limits(262144, 65536)


def test_our_own_namespaces_are_left_out_of_the_count(fake_proc: Path, monkeypatch):
    seen = []
    monkeypatch.setattr(sysctl, "foreign_entries",
                        lambda ours: seen.append(list(ours)) or {})  # type: ignore[func-returns-value]
    with ConntrackLimits(True, lambda: [11, 12]) as limits:
        limits.set(4096, None)
    assert seen == [[11, 12]]


# ------------------------------------------------------------------ the watchdog


def run_watchdog(monkeypatch, lines: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert sysctl.watchdog_main(["262144", "65536"]) == 0


def test_watchdog_restores_when_the_benchmark_died_holding_lowered_limits(fake_proc, monkeypatch):
    sysctl._write(Limits(4096, 1024))
    run_watchdog(monkeypatch, "set 4096 1024\n")  # EOF without "done": the benchmark died
    assert sysctl.read_limits() == Limits(262144, 65536)


def test_watchdog_does_nothing_after_a_normal_end(fake_proc, monkeypatch):
    sysctl._write(Limits(4096, 1024))
    run_watchdog(monkeypatch, "set 4096 1024\ndone\n")
    assert sysctl.read_limits() == Limits(4096, 1024)


def test_watchdog_never_undoes_somebody_elses_change(fake_proc, monkeypatch):
    sysctl._write(Limits(100000, 65536))  # changed by someone else after we set ours
    run_watchdog(monkeypatch, "set 4096 1024\n")
    assert sysctl.read_limits() == Limits(100000, 65536)


def test_waiting_for_quiet_polls_until_the_lowering_would_be_allowed(fake_proc, monkeypatch):
    counts = iter([5000, 3000, 10])
    monkeypatch.setattr(sysctl, "foreign_entries", lambda ours: {1: next(counts)})
    monkeypatch.setattr(sysctl.time, "sleep", lambda s: None)
    limits = ConntrackLimits(True, list)
    assert limits.wait_quiet(4096, 1024, timeout=60) is True  # 5000, 3000: no; 10: yes


def test_waiting_for_quiet_gives_up_after_the_timeout(fake_proc, monkeypatch):
    monkeypatch.setattr(sysctl, "foreign_entries", foreign(5000))
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(sysctl.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(sysctl.time, "sleep", lambda s: None)
    assert ConntrackLimits(True, list).wait_quiet(4096, None, timeout=30) is False
