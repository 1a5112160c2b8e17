"""Typed errors, made once at the boundary from the tools' exit codes and stderr.

    NetfilterError            anything that went wrong talking to the kernel's tools
    ├── CommandNotFound       the binary is missing
    ├── LockHeld              another process holds the xtables lock past our wait
    └── RestoreFailed         iptables-restore / nft -f rejected our input (nothing was applied)

Callers branch on these types, never on stderr text.
"""

from __future__ import annotations

import re

__all__ = ["CommandNotFound", "LockHeld", "NetfilterError", "RestoreFailed", "restore_error"]


class NetfilterError(RuntimeError):
    """Base class; the message is one line."""

    reason = "error"


class CommandNotFound(NetfilterError):
    reason = "command_not_found"


class LockHeld(NetfilterError):
    reason = "lock_held"


class RestoreFailed(NetfilterError):
    """The kernel tool rejected our transaction; ``context`` holds the input lines around it."""

    reason = "restore_failed"

    def __init__(self, message: str, context: str = "") -> None:
        super().__init__(message)
        self.context = context


_LINE = re.compile(r"(?:line:? |stdin:)(\d+)")


def restore_error(tool: str, stderr: str, stdin: str) -> NetfilterError:
    """Classify a failed restore; point at the offending input line when the tool names one."""
    first = stderr.strip().splitlines()[0] if stderr.strip() else "no error output"
    if "xtables lock" in stderr:
        return LockHeld(f"{tool}: {first}")
    m = _LINE.search(stderr)
    context = ""
    if m:
        lines = stdin.splitlines()
        n = int(m.group(1))
        lo, hi = max(1, n - 2), min(len(lines), n + 2)
        context = "\n".join(
            f"{'>' if i == n else ' '} {i:4d}  {lines[i - 1]}" for i in range(lo, hi + 1))
    return RestoreFailed(f"{tool} failed: {first}", context)
