"""unbound.log stays bounded: its tail moves to unbound.log.1 and unbound keeps writing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dnsguard.cache import unbound as unbound_mod
from dnsguard.cache.runtime import STATE_FILES
from dnsguard.cache.unbound import Unbound

LINE = b"[1764662400] unbound[42:0] info: 198.18.2.11 svc-1.default.svc.cluster.local. A IN\n"


def test_cap_keeps_the_last_whole_lines_and_unbound_writes_on_without_a_hole(
        tmp_path: Path) -> None:
    ub = Unbound(tmp_path)
    ub.log_cap = 64 << 10
    # unbound's stdout/stderr: a descriptor opened O_APPEND ("ab"), as start() hands it over
    fd = os.open(ub.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        lines = [b"%06d " % i + LINE for i in range(3000)]
        os.write(fd, b"".join(lines))
        assert ub.cap_log()
        assert ub.logfile.stat().st_size == 0
        kept = ub.rotated_log.read_bytes()
        assert len(kept) <= ub.log_cap
        assert kept.endswith(lines[-1]) and kept.startswith(b"0")  # whole lines only
        assert kept.split(b"\n")[0] + b"\n" in lines
        os.write(fd, b"after the cut\n")
    finally:
        os.close(fd)
    assert ub.logfile.read_bytes() == b"after the cut\n"  # offset 0, not a sparse file
    assert not ub.cap_log()  # under the cap: nothing to do


def test_a_running_cache_log_is_capped_by_the_watcher(tmp_path: Path, monkeypatch) -> None:
    """A stand-in unbound that floods its log; the loop beside the exit watcher bounds it."""
    monkeypatch.setattr(unbound_mod, "LOG_CHECK_SECONDS", 0.05)
    fake = tmp_path / "unbound"
    fake.write_text("#!/bin/sh\ni=0\nwhile [ $i -lt 4000 ]; do\n"
                    "  echo \"$i line of a chatty unbound log, long enough to add up quickly\"\n"
                    "  i=$((i+1))\ndone\nexec sleep 30\n")
    fake.chmod(0o755)
    ub = Unbound(tmp_path / "state", str(fake))
    ub.log_cap = 16 << 10
    ub.state_dir.mkdir()
    ub.conf.write_text("server:\n")
    ub.start()
    try:
        deadline = time.monotonic() + 20
        # done writing (the last line is in one of the two files) and cut back to the cap
        while not (b"3999 line" in _read(ub.logfile) + _read(ub.rotated_log)
                   and ub.logfile.stat().st_size <= ub.log_cap):
            if time.monotonic() > deadline:
                pytest.fail(f"unbound.log not capped: {ub.logfile.stat().st_size} bytes")
            time.sleep(0.05)
        assert 0 < ub.rotated_log.stat().st_size <= ub.log_cap
    finally:
        ub.stop()


def test_cleanup_removes_the_rotated_log() -> None:
    assert "unbound.log.1" in STATE_FILES


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""
