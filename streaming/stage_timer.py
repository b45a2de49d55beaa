"""Device time per engine stage (audio features, UNet, decode, host copies), for `bench --gpu`.

The engine wraps each stage in `engine.stages(name)`. By default that is a no-op; the benchmark installs a
`StageTimer`, which on CUDA brackets the stage with CUDA events (the device's own time, read once at the end, so
timing adds no synchronisation to the run) and elsewhere with wall-clock time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

STAGES = ("audio_features", "unet", "decode", "host_copy")
MAX_RECORDS = 200_000  # a bound on what one measurement holds (~1 hour of 8 sessions)


class NoStageTimer:
    def __call__(self, name: str):
        return nullcontext()


class StageTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._records: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, name: str):
        if len(self._records) >= MAX_RECORDS:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._records.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._records.append((name, t0, time.perf_counter()))

    def reset(self) -> None:
        self._records.clear()

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds spent in each stage since the last reset (waits for the device on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = dict.fromkeys(STAGES, 0.0)
        for name, start, end in self._records:
            ms = start.elapsed_time(end) if self.cuda else 1000.0 * (end - start)
            totals[name] = totals.get(name, 0.0) + ms
        return totals
