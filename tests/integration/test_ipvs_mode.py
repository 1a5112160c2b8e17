"""IPVS-mode tests: boot Debian's stock kernel under qemu and run tests/vm there.

This machine's kernel has no IPVS and no dummy links; Debian's stock kernel has both. One boot
runs the whole guest suite (pytest starts slowly under emulation). Skipped where the harness
cannot run, unless DNSGUARD_VM_REQUIRED=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dnsguard.testing import vm

pytestmark = [pytest.mark.root, pytest.mark.vm]

ROOT = Path(__file__).resolve().parents[2]


def test_ipvs_mode_suite_passes_in_the_guest(tmp_path: Path) -> None:
    reason = vm.available()
    if reason is not None:
        if os.environ.get("DNSGUARD_VM_REQUIRED") == "1":
            pytest.fail(f"qemu harness unavailable: {reason}")
        pytest.skip(reason)
    script = (f"cd {ROOT} && {sys.executable} -m pytest -p no:cacheprovider -q -s "
              f"-o addopts='' -W error tests/vm")
    result = vm.run(script, timeout=2400, cwd=ROOT, memory_mb=2048, stream=sys.stdout)
    print(result.output[-6000:])
    assert result.returncode == 0, result.output[-6000:]
    assert " passed" in result.output and "skipped" not in result.output.split("\n")[-2]
