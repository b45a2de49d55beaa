"""When the eyes close: a seeded blink schedule, for a clip (`blink_video`) and for a live session (`SessionBlinker`).

The schedule (`BlinkSchedule`) keeps the requested rate over every minute while the intervals between blinks
are random: blink k falls in the k-th slot of 60/rate seconds at a random place inside it (so a minute holds
rate +- 1 blinks); each blink lasts 100-300 ms (closing faster than opening), and its fully closed moment falls on
a frame so that every blink is seen closed at least once. The lids are drawn by `eyelid.close_eyes`
(docs/blink.md). The rate is the live control `blinks_per_minute` (`GenerationParams`, validated there, once);
a live session's schedule is held by its `LiveControls`, which changes its rate with the control.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from vexpress_rt.errors import InputError

from .eyelid import close_eyes

DURATION_S = (0.10, 0.30)  # a whole blink, closing + closed + opening
CLOSING_SHARE, HOLD_SHARE = 0.35, 0.10  # of the duration; the rest is the (slower) opening
SLOT_JITTER = 0.35  # a blink lies within +-35 % of a slot around the slot's middle
MIN_GAP_S = 0.45  # between the closed moments of two blinks


@dataclass(frozen=True)
class Blink:
    start: float  # seconds
    closing: float
    hold: float
    opening: float

    @property
    def end(self) -> float:
        return self.start + self.closing + self.hold + self.opening

    def closure(self, t: float) -> float:
        """0 open .. 1 closed at time t (smoothstep ramps)."""
        x = t - self.start
        if x <= 0 or t >= self.end:
            return 0.0
        if x < self.closing:
            return _smoothstep(x / self.closing)
        x -= self.closing
        if x <= self.hold:
            return 1.0
        return 1.0 - _smoothstep((x - self.hold) / self.opening)


def _smoothstep(x: float) -> float:
    return x * x * (3 - 2 * x)


class BlinkSchedule:
    """When the eyes close, frame by frame: `closure(index)` in [0, 1] for frames at `fps`, asked in order.

    Seeded: the same seed, rate and rate changes give the same blinks. `set_rate` changes the rate from a frame
    on (a blink under way finishes; 0 stops blinking)."""

    def __init__(self, blinks_per_minute: float, fps: float, seed: int = 0):
        if not fps > 0:
            raise InputError(f"fps must be positive, got {fps!r}")
        self.fps = float(fps)
        self._rate = float(blinks_per_minute)  # validated where it entered (GenerationParams)
        self._rng = np.random.default_rng(seed)
        self._blinks: list[Blink] = []  # planned, in time order; those over are dropped as frames pass
        self._origin = 0.0  # where slot 0 of the current rate starts
        self._slot = 0  # the next slot to plan
        self._last_peak = -math.inf

    def set_rate(self, blinks_per_minute: float, from_index: int = 0) -> None:
        rate = float(blinks_per_minute)
        t = from_index / self.fps
        self._blinks = [b for b in self._blinks if b.start < t]  # under way or over: kept
        self._rate, self._origin, self._slot = rate, t, 0

    def closure(self, index: int) -> float:
        t = index / self.fps
        self._plan_until(t)
        while self._blinks and self._blinks[0].end <= t:
            self._blinks.pop(0)
        return max((b.closure(t) for b in self._blinks if b.start < t), default=0.0)

    def _plan_until(self, t: float) -> None:
        if self._rate <= 0:
            return
        period = 60.0 / self._rate
        while not self._blinks or self._blinks[-1].start <= t:
            slot_middle = self._origin + (self._slot + 0.5) * period
            self._slot += 1
            peak = slot_middle + self._rng.uniform(-SLOT_JITTER, SLOT_JITTER) * period
            peak = max(peak, self._last_peak + MIN_GAP_S)
            peak = math.ceil(peak * self.fps - 1e-9) / self.fps  # fully closed on a frame
            duration = self._rng.uniform(*DURATION_S)
            closing, hold = CLOSING_SHARE * duration, HOLD_SHARE * duration
            blink = Blink(peak - closing, closing, hold, duration - closing - hold)
            self._last_peak = peak
            self._blinks.append(blink)


class SessionBlinker:
    """A live session's blinks, drawn over each output frame (speech or idle) as it is shown. Threads: `set_rate`
    from the controls (the event loop), `apply` from the reader."""

    def __init__(self, fps: float, seed: int, blinks_per_minute: float):
        self._schedule = BlinkSchedule(blinks_per_minute, fps, seed)
        self._lock = threading.Lock()
        self._next_index = 0  # the frame a rate change takes effect from

    def set_rate(self, blinks_per_minute: float) -> None:
        """Blinks per minute (validated: GenerationParams) from the next frame shown on (0: never; a blink under
        way finishes)."""
        with self._lock:
            self._schedule.set_rate(blinks_per_minute, self._next_index)

    def apply(self, index: int, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Output frame `index` with the eyes as the schedule has them (`kps`: eye centres in its pixels)."""
        with self._lock:
            self._next_index = index + 1
            closure = self._schedule.closure(index)
        return close_eyes(image, kps, closure)


def blink_video(
    frames: np.ndarray, kps_sequence: np.ndarray, blinks_per_minute: float, fps: float, seed: int = 0
) -> np.ndarray:
    """uint8 (T, H, W, 3) frames with blinks drawn in, each frame's eyes at its own key points (T, >=2, 2)."""
    if blinks_per_minute == 0:
        return frames
    schedule = BlinkSchedule(blinks_per_minute, fps, seed)
    return np.stack([close_eyes(f, k, schedule.closure(i)) for i, (f, k) in enumerate(zip(frames, kps_sequence))])
