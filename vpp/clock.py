"""One clock for the whole service.

No code reads the wall clock directly: everything asks a :class:`Clock`. With ``time_scale`` > 1
service time runs faster than wall time from ``time_origin`` (epoch ms). Two processes given the
same scale and origin compute the same service time, so a simulator and the service can play a
2-hour event in two minutes and still agree on every timestamp.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime


class Clock:
    def __init__(self, time_scale: float = 1.0, time_origin_ms: int | None = None) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.time_scale = float(time_scale)
        wall_ms = time.time() * 1000.0
        self.origin_ms = int(time_origin_ms) if time_origin_ms is not None else int(wall_ms)
        # Service time at the origin equals wall time at the origin.

    def now_ms(self) -> int:
        """Service time, epoch milliseconds."""
        wall_ms = time.time() * 1000.0
        return int(self.origin_ms + (wall_ms - self.origin_ms) * self.time_scale)

    def now_s(self) -> float:
        wall_ms = time.time() * 1000.0
        return (self.origin_ms + (wall_ms - self.origin_ms) * self.time_scale) / 1000.0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_s(), tz=UTC)

    def wall_seconds(self, service_seconds: float) -> float:
        """How long ``service_seconds`` of service time last on the wall clock."""
        return service_seconds / self.time_scale

    async def sleep(self, service_seconds: float) -> None:
        await asyncio.sleep(max(0.0, service_seconds / self.time_scale))


class ManualClock(Clock):
    """A clock that only moves when told to: for tests and back-tests."""

    def __init__(self, start_ms: int) -> None:
        super().__init__(1.0, start_ms)
        self._now_ms = int(start_ms)

    def now_ms(self) -> int:
        return self._now_ms

    def now_s(self) -> float:
        return self._now_ms / 1000.0

    def advance(self, seconds: float) -> None:
        self._now_ms += int(seconds * 1000)

    async def sleep(self, service_seconds: float) -> None:
        self.advance(service_seconds)
        await asyncio.sleep(0)


_clock: Clock | None = None


def get_clock() -> Clock:
    """The process-wide clock, built from settings on first use."""
    global _clock
    if _clock is None:
        from vpp.settings import get_settings

        s = get_settings()
        _clock = Clock(s.time_scale, s.time_origin)
    return _clock


def set_clock(clock: Clock) -> None:
    global _clock
    _clock = clock
