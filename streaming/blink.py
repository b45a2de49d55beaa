"""A live session's blinking: the seeded schedule and the eyelid applied to each output frame.

The frames are the model's (speech) or the idle clip's; V-Express keeps the eyes open, so the lids are drawn over
them after decoding (`vexpress_rt.blink`, docs/blink.md). The rate may change while the session runs
(`set_rate`, any thread); 0 stops blinking.
"""

from __future__ import annotations

import threading

import numpy as np

from vexpress_rt.blink import NATURAL_BLINKS_PER_MINUTE, BlinkSchedule, close_eyes


class SessionBlinker:
    def __init__(self, fps: int, seed: int, blinks_per_minute: float = NATURAL_BLINKS_PER_MINUTE):
        self._schedule = BlinkSchedule(blinks_per_minute, fps, seed)
        self._lock = threading.Lock()
        self._next_index = 0  # the frame a rate change takes effect from

    @property
    def rate(self) -> float:
        return self._schedule.rate

    def set_rate(self, blinks_per_minute: float) -> None:
        """Blinks per minute from the next frame on (0: never; a blink under way finishes). InputError if out of
        range (0..60)."""
        with self._lock:
            self._schedule.set_rate(blinks_per_minute, self._next_index)

    def apply(self, index: int, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Output frame `index` with the eyes as the schedule has them (`kps`: eye centres in its pixels)."""
        with self._lock:
            self._next_index = index + 1
            closure = self._schedule.closure(index)
        return close_eyes(image, kps, closure)
