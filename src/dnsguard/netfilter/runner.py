"""The command-runner seam: the only way dnsguard starts processes.

Production code gets `SubprocessRunner`; unit tests get `dnsguard.testing.fakes.FakeRunner`, which
replays scripted results. Keeping the seam this small (argv and stdin in, exit code and output
out) is what lets the planner, the diff and the agent loop be tested without root.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dnsguard.netfilter.errors import CommandNotFound, NetfilterError

__all__ = ["READ_TIMEOUT", "Completed", "Runner", "SubprocessRunner"]

#: Reading every rule back (``iptables-save``, ``nft list table``) takes seconds at 10k
#: Services, more on a loaded node; a read that times out fails the whole sync.
READ_TIMEOUT = 120.0


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Runner(Protocol):
    def run(self, argv: Sequence[str], *, stdin: str | None = None,
            timeout: float = 30.0) -> Completed: ...


class SubprocessRunner:
    """Runs commands for real; an optional prefix (``ip netns exec NS``) targets a namespace."""

    def __init__(self, prefix: Sequence[str] = ()) -> None:
        self.prefix = tuple(prefix)

    def run(self, argv: Sequence[str], *, stdin: str | None = None,
            timeout: float = 30.0) -> Completed:
        full = (*self.prefix, *argv)
        try:
            proc = subprocess.run(
                full, input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
            )
        except FileNotFoundError:
            raise CommandNotFound(
                f"{argv[0]} not found: install it or pick another --backend") from None
        except subprocess.TimeoutExpired:
            raise NetfilterError(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
        return Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
