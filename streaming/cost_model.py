"""Admission control's cost model: seconds per worker call, measured per (denoiser settings, batch size) on the
device in use, and the fraction of the worker's time a set of sessions would take.

Batching pays on a GPU (a batch of 4 windows costs far less than 4 calls), so one per-frame-pass figure would
refuse sessions the device can serve. Every batched call the worker makes is recorded under its real batch size;
the engine's warm-up measures each batch bucket once at start-up, so the model is calibrated before the first
session. A batch size never measured is estimated conservatively: from the nearest larger batch measured (a
smaller batch never costs more; with CUDA graphs it runs padded to that bucket anyway), else linearly from the
largest smaller one; settings never measured are scaled from others by their UNet frame-passes per call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .denoiser import DenoiserSettings

EMA = 0.2  # weight of a new measurement


@dataclass(frozen=True)
class Span:
    """A stretch of device work, in seconds on one clock (device events on CUDA, the wall clock elsewhere)."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def overlap(self, other: Span) -> float:
        return max(0.0, min(self.end, other.end) - max(self.start, other.start))


class PipelinedCost:
    """The device time one call of the pipelined worker costs, from its recorded spans. The decode of call i
    (finisher stream) runs while the UNet of call i+1 runs (worker stream): adding both spans counts the overlap
    twice, and admission would refuse sessions the device can serve. A call costs the interval since the previous
    UNet call completed (its UNet span when the device had idled between), plus the share of a decode that
    overlapped no UNet work. A decode's overlap is known once the next UNet call is done, so call i is charged the
    non-overlapping share of call i-1's decode (the pipeline's steady state: consecutive calls alike); the first
    call, with nothing before it, its whole decode. Fed in order (the finisher's one thread)."""

    def __init__(self) -> None:
        self._last_unet_end: float | None = None
        self._last_decode: Span | None = None

    def call(self, unet: Span, decode: Span) -> float:
        begin = unet.start if self._last_unet_end is None else max(unet.start, self._last_unet_end)
        unet_s = unet.end - begin
        previous = self._last_decode
        if previous is None:
            decode_s = decode.seconds
        else:
            decode_s = previous.seconds - previous.overlap(Span(begin, unet.end))
        self._last_unet_end, self._last_decode = unet.end, decode
        return unet_s + max(0.0, decode_s)


@dataclass(frozen=True)
class Demand:
    """One session's load: its denoiser settings and frames per second."""

    settings: DenoiserSettings
    fps: float


class CostModel:
    def __init__(self) -> None:
        self._call_s: dict[tuple[DenoiserSettings, int], float] = {}
        self._features_s: float | None = None  # audio features, per chunk and session

    def record_call(self, settings: DenoiserSettings, batch: int, seconds: float) -> None:
        key = (settings, batch)
        old = self._call_s.get(key)
        self._call_s[key] = seconds if old is None else (1 - EMA) * old + EMA * seconds

    def record_features(self, seconds: float) -> None:
        old = self._features_s
        self._features_s = seconds if old is None else (1 - EMA) * old + EMA * seconds

    @property
    def measured(self) -> dict[tuple[DenoiserSettings, int], float]:
        return dict(self._call_s)

    def _for_settings(self, settings: DenoiserSettings, batch: int) -> float | None:
        sizes = sorted(b for s, b in self._call_s if s == settings)
        if not sizes:
            return None
        larger = [b for b in sizes if b >= batch]
        if larger:
            return self._call_s[(settings, larger[0])]
        top = sizes[-1]
        return self._call_s[(settings, top)] * batch / top

    def call_seconds(self, settings: DenoiserSettings, batch: int) -> float | None:
        """Estimated seconds of one worker call (UNet + decode) over `batch` sessions' windows."""
        own = self._for_settings(settings, batch)
        if own is not None:
            return own
        estimates = [
            cost * settings.passes_per_call / other.passes_per_call
            for other in {s for s, _ in self._call_s}
            if (cost := self._for_settings(other, batch)) is not None
        ]
        return max(estimates) if estimates else None

    def load(self, demands: Iterable[Demand], max_batch: int) -> float | None:
        """Fraction of the worker's time the sessions need: sessions with equal settings and fps share batched
        calls of up to `max_batch` windows, each call making `new_frames` frames per session. None before any
        measurement."""
        groups: dict[tuple[DenoiserSettings, float], int] = {}
        for d in demands:
            groups[(d.settings, d.fps)] = groups.get((d.settings, d.fps), 0) + 1
        total = 0.0
        for (settings, fps), count in groups.items():
            calls_per_s = fps / settings.new_frames
            full, rest = divmod(count, max_batch)
            for batch, n in ((max_batch, full), (rest, 1 if rest else 0)):
                if not n:
                    continue
                cost = self.call_seconds(settings, batch)
                if cost is None:
                    return None
                total += n * cost * calls_per_s
            if self._features_s is not None:
                total += count * self._features_s * calls_per_s
        return total

    def sessions_held(self, settings: DenoiserSettings, fps: float, max_batch: int, margin: float) -> int:
        """How many sessions of these settings fit under `margin` (the bench prints it); 0 when unmeasured."""
        n = 0
        while n < 64:
            load = self.load([Demand(settings, fps)] * (n + 1), max_batch)
            if load is None or load > margin or math.isnan(load):
                break
            n += 1
        return n
