"""Clocks are passed in, never read inside the engine, so tests are deterministic."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock time in epoch milliseconds."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (tests, replay)."""

    def __init__(self, now_ms: int = 0) -> None:
        self._now = int(now_ms)

    def now_ms(self) -> int:
        return self._now

    def set(self, now_ms: int) -> None:
        self._now = int(now_ms)

    def advance(self, ms: int) -> None:
        self._now += int(ms)
