"""One wall clock per session: frame `i` is due at `start + i / fps`. Every track reads its timing from here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class FrameClock:
    def __init__(self, fps: float, now: Callable[[], float] = time.monotonic):
        self.fps = float(fps)
        self._now = now
        self.t0: float | None = None

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = self._now()

    def due(self, index: float) -> float:
        if self.t0 is None:
            self.t0 = self._now()
        return self.t0 + index / self.fps

    def late_by(self, index: float) -> float:
        """Seconds behind schedule for frame `index` (negative: early)."""
        return self._now() - self.due(index)

    async def wait(self, index: float) -> None:
        """Sleep until frame `index` is due; returns at once when already late (the caller decides to skip)."""
        delay = -self.late_by(index)
        if delay > 0:
            await asyncio.sleep(delay)
