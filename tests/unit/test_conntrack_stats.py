"""Conntrack statistics: real file formats of several kernel generations, both sources.

The formats below are the headers the kernels print (net/netfilter/nf_conntrack_standalone.c)
with made-up per-CPU values, so sums and absences can be checked by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dnsguard.node.conntrack import (
    CachedConntrack,
    kernel_release,
    parse_conntrack_count,
    parse_conntrack_s,
    parse_proc_stat,
    read_conntrack,
)
from dnsguard.testing.fakes import FakeRunner

# 6.x: 'clashres' (5.10+) and 'chainlength' (chaintoolong); new/ignore/delete printed as 0.
PROC_6X = """\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000123  00000002 00000010 00000000 00000005 00000000 00000000 00000000 00000000 00000001 00000000 00000003 00000000  00000000 00000000 00000000 00000004
00000123  00000001 00000020 00000000 00000006 00000000 00000000 00000001 00000000 00000000 00000007 00000000 00000002  00000000 00000000 00000000 00000000
"""

# 5.10-5.15: 'clashres' but still 'delete_list', printed as 0.
PROC_510 = """\
entries  clashres found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000000a  00000003 00000001 00000000 00000000 00000000 00000000 00000000 00000009 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000
"""

# 4.x: every column maintained, 'searched' where clashres is now, no clash_resolve at all.
PROC_4X = """\
entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000042  00000100 00000050 00000020 00000005 00000000 00000010 00000008 00000015 00000002 00000001 00000000 00000000  00000000 00000000 00000000 00000003
00000042  00000080 00000030 00000010 00000003 00000000 00000005 00000004 0000000a 00000001 00000000 00000001 00000000  00000000 00000000 00000000 00000002
"""

# 3.x: no search_restart column.
PROC_3X = """\
entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete
00000001  00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000  00000000 00000000 00000000
"""

# conntrack-tools 1.4.7 on 6.x (each line ends with a space).
CONNTRACK_S_6X = (
    "cpu=0   \tfound=16 invalid=5 insert=0 insert_failed=1 drop=0 early_drop=3 error=0 "
    "search_restart=4 clash_resolve=2 chaintoolong=0 \n"
    "cpu=1   \tfound=32 invalid=6 insert=0 insert_failed=0 drop=7 early_drop=0 error=2 "
    "search_restart=0 clash_resolve=1 chaintoolong=1 \n"
)

CONNTRACK_S_4X = """\
cpu=0           searched=256 found=80 new=48 invalid=8 ignore=0 delete=21 delete_list=12 insert=37 insert_failed=3 drop=1 early_drop=1 error=0 search_restart=5
cpu=1           searched=1 found=1 new=1 invalid=0 ignore=0 delete=0 delete_list=0 insert=1 insert_failed=0 drop=0 early_drop=0 error=0 search_restart=0
"""


def test_6x_sums_cpus_by_header_name_and_drops_placeholder_columns() -> None:
    counters, entries = parse_proc_stat(PROC_6X)
    assert entries == 0x123  # namespace-wide, printed on each row: taken once, not summed
    assert counters["clash_resolve"] == 3
    assert counters["found"] == 0x30
    assert counters["insert_failed"] == 1
    assert counters["drop"] == 7
    assert counters["early_drop"] == 3
    assert counters["error"] == 2  # 'icmp_error' under its conntrack -S name
    assert counters["chaintoolong"] == 1
    assert counters["search_restart"] == 4
    for dead in ("new", "ignore", "delete", "searched", "delete_list", "entries"):
        assert dead not in counters


def test_510_has_clash_resolve_and_no_delete_list() -> None:
    counters, entries = parse_proc_stat(PROC_510)
    assert (entries, counters["clash_resolve"], counters["insert"]) == (10, 3, 9)
    assert "delete_list" not in counters
    assert "chaintoolong" not in counters


def test_4x_keeps_every_column_but_has_no_clash_resolve() -> None:
    counters, entries = parse_proc_stat(PROC_4X)
    assert entries == 0x42
    assert "clash_resolve" not in counters  # absent, not zero: no finding may come from it
    assert counters["searched"] == 0x180
    assert counters["new"] == 0x30
    assert counters["delete_list"] == 12
    assert counters["insert_failed"] == 3
    assert counters["early_drop"] == 1
    assert counters["search_restart"] == 5


def test_3x_lacks_search_restart() -> None:
    counters, _ = parse_proc_stat(PROC_3X)
    assert "search_restart" not in counters
    assert counters["insert"] == 1


@pytest.mark.parametrize("text", ["", "cpu=0 found=1\n", PROC_6X.splitlines()[0] + "\n0 1 2\n"])
def test_bad_proc_files_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_stat(text)


def test_conntrack_s_6x_and_4x() -> None:
    new = parse_conntrack_s(CONNTRACK_S_6X)
    assert new == {"found": 48, "invalid": 11, "insert": 0, "insert_failed": 1, "drop": 7,
                   "early_drop": 3, "error": 2, "search_restart": 4, "clash_resolve": 3,
                   "chaintoolong": 1}
    old = parse_conntrack_s(CONNTRACK_S_4X)
    assert old["searched"] == 257 and old["insert_failed"] == 3
    assert "clash_resolve" not in old
    with pytest.raises(ValueError):
        parse_conntrack_s("conntrack v1.4.7: Operation not permitted\n")


def test_count_output() -> None:
    assert parse_conntrack_count("42\n") == 42


def _proc(tmp_path: Path, stat: str | None, count: str | None = "12") -> Path:
    sysdir = tmp_path / "sys/net/netfilter"
    sysdir.mkdir(parents=True)
    (tmp_path / "sys/kernel").mkdir(parents=True)
    (tmp_path / "sys/kernel/osrelease").write_text("5.4.0-150-generic\n")
    (sysdir / "nf_conntrack_max").write_text("4096\n")
    (sysdir / "nf_conntrack_buckets").write_text("1024\n")
    if count is not None:
        (sysdir / "nf_conntrack_count").write_text(count + "\n")
    if stat is not None:
        (tmp_path / "net/stat").mkdir(parents=True)
        (tmp_path / "net/stat/nf_conntrack").write_text(stat)
    return tmp_path


def test_reads_the_proc_file_first_and_never_runs_conntrack(tmp_path: Path) -> None:
    runner = FakeRunner()
    stats = read_conntrack(runner, _proc(tmp_path, PROC_6X))
    assert stats is not None
    assert stats.source.endswith("net/stat/nf_conntrack")
    assert (stats.entries, stats.max, stats.buckets) == (12, 4096, 1024)  # sysctl count wins
    assert stats.get("clash_resolve") == 3
    assert runner.calls == []


def test_falls_back_to_ctnetlink_when_the_proc_file_is_absent(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.add(["conntrack", "-S"], CONNTRACK_S_6X)
    runner.add(["conntrack", "-C"], "77\n")
    stats = read_conntrack(runner, _proc(tmp_path, None, count=None))
    assert stats is not None
    assert stats.source == "ctnetlink (conntrack -S)"
    assert stats.get("insert_failed") == 1
    assert stats.entries == 77
    assert stats.max == 4096


def test_scrapes_fork_conntrack_once_per_max_age(tmp_path: Path) -> None:
    """Where the proc file is missing, a flood of /metrics requests must not fork per request."""
    runner = FakeRunner()
    runner.add(["conntrack", "-S"], CONNTRACK_S_6X)
    runner.add(["conntrack", "-C"], "77\n")
    now = [100.0]
    cached = CachedConntrack(runner, _proc(tmp_path, None, count=None), max_age=10.0,
                             clock=lambda: now[0])
    first = cached.read()
    for _ in range(50):
        now[0] += 0.1
        assert cached.read() is first
    assert [argv for argv, _ in runner.calls] == [("conntrack", "-S"), ("conntrack", "-C")]
    now[0] = 110.0  # 10 s after the first reading: read again
    runner.add(["conntrack", "-C"], "78\n")
    fresh = cached.read()
    assert fresh is not None and fresh.entries == 78
    assert len(runner.calls) == 4


def test_nothing_readable_means_no_stats(tmp_path: Path) -> None:
    assert read_conntrack(FakeRunner(), tmp_path) is None


def test_kernel_release(tmp_path: Path) -> None:
    assert kernel_release(_proc(tmp_path, None)) == "5.4.0-150-generic"
    assert kernel_release(tmp_path / "nowhere") is None
