"""Fixtures for real-kernel tests in lab nodes (see dnsguard.testing.lab).

`lab_host` checks once per session that labs can be built here (root, tools) and removes
labs left behind by crashed earlier runs; labs of live parallel runs are left alone.
`make_lab` builds labs for one test and tears every one of them down afterwards, failing
the test loudly if teardown leaks anything. Module-scoped labs are plain ``with Lab(...)``
fixtures in the test modules, depending on `lab_host`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dnsguard.testing.lab import Lab, LabConfig

LabFactory = Callable[[LabConfig], Lab]

_TOOLS = ("ip", "dnsmasq", "dig", "conntrack", "nft", "iptables-legacy-save",
          "iptables-nft-save", "getent")


def lab_unavailable() -> str | None:
    """Why labs cannot be built on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def lab_host() -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    Lab.remove_stale()


@pytest.fixture
def make_lab(lab_host: None, tmp_path: Path) -> Iterator[LabFactory]:
    """Build labs inside one test; all are closed after it, pass or fail."""
    labs: list[Lab] = []

    def make(config: LabConfig) -> Lab:
        lab = Lab(config, workdir=tmp_path / f"lab{len(labs)}-{config.label()}")
        labs.append(lab)
        lab.start()  # tears itself down if building fails
        return lab

    try:
        yield make
    finally:
        errors = []
        for lab in labs:
            try:
                lab.close()
            except Exception as exc:  # keep closing the others, then fail
                errors.append(exc)
        if errors:
            raise errors[0]

