"""Exponential backoff with jitter, and the waiting it needs, both injectable.

The policy is a frozen value; the attempt counter lives in the caller (one per reflector), so
a policy can be shared. Jitter multiplies each delay by ``1 + jitter * rand()``: after an API
server restart thousands of agents must not come back in lock-step. Waiting goes through a
`Waiter` that returns early when the stop event is set, so shutdown never waits out a backoff,
and tests pass a recording waiter instead of sleeping.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Backoff", "Waiter", "event_wait"]


class Waiter(Protocol):
    def __call__(self, stop: threading.Event, seconds: float) -> bool:
        """Block up to ``seconds``; True when ``stop`` was set (the caller must return)."""
        ...


def event_wait(stop: threading.Event, seconds: float) -> bool:
    return stop.wait(seconds)


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    rand: Callable[[], float] = field(default=random.random, compare=False)

    def delay(self, attempt: int, *, at_least: float = 0.0) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry).

        ``at_least`` is a server's Retry-After: honoured even above the cap, because a server
        that sheds load (429) asks for exactly that.
        """
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return max(at_least, base * (1.0 + self.jitter * self.rand()))
