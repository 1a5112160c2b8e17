"""doctor's query-log window survives the agent capping the log mid-window."""

from __future__ import annotations

from pathlib import Path

from dnsguard.diagnose.sampler import Sampler
from dnsguard.testing.fakes import FakeRunner

LINE = b"198.18.0.12 storm%d.example.org. A IN NXDOMAIN 0.000 0 40\n"


def test_lines_written_during_the_window_are_read_from_where_it_started(tmp_path: Path) -> None:
    log = tmp_path / "unbound.log"
    log.write_bytes(LINE % 0)
    sampler = Sampler(FakeRunner(), cache_log=log)
    start = log.stat().st_size
    with log.open("ab") as f:
        f.write(LINE % 1 + LINE % 2)
    lines = sampler._window_lines(start)
    assert [ln.split()[1] for ln in lines] == ["storm1.example.org.", "storm2.example.org."]


def test_a_log_cut_during_the_window_still_gives_its_lines(tmp_path: Path) -> None:
    log = tmp_path / "unbound.log"
    log.write_bytes(b"".join(LINE % i for i in range(50)))
    sampler = Sampler(FakeRunner(), cache_log=log)
    start = log.stat().st_size
    # the cap: the tail goes to unbound.log.1, the log starts again at offset 0
    (tmp_path / "unbound.log.1").write_bytes(b"".join(LINE % i for i in range(40, 60)))
    log.write_bytes(LINE % 60 + LINE % 61)
    names = [ln.split()[1] for ln in sampler._window_lines(start)]
    assert "storm60.example.org." in names and "storm55.example.org." in names
    assert len(names) == 22
