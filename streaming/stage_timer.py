"""Device time per engine stage (audio features, UNet, decode, host copies), for `bench --gpu`.

The engine wraps each stage in `engine.stages(name)`. By default that is a no-op; the benchmark installs a
`StageTimer`, which on CUDA brackets the stage with CUDA events (the device's own time, read once at the end, so
timing adds no synchronisation to the run) and elsewhere with wall-clock time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

STAGES = ("audio_features", "unet", "decode", "host_copy")
MAX_RECORDS = 200_000  # a bound on what one measurement holds (~1 hour of 8 sessions)


class NoStageTimer:
    def __call__(self, name: str) -> AbstractContextManager[None]:
        return nullcontext()

    def reset(self) -> None:
        pass

    def totals_ms(self) -> dict[str, float]:
        return dict.fromkeys(STAGES, 0.0)


class StageTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._cuda_records: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._wall_records: list[tuple[str, float, float]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if len(self._cuda_records) + len(self._wall_records) >= MAX_RECORDS:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._cuda_records.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._wall_records.append((name, t0, time.perf_counter()))

    def reset(self) -> None:
        self._cuda_records.clear()
        self._wall_records.clear()

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds spent in each stage since the last reset (waits for the device on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = dict.fromkeys(STAGES, 0.0)
        for name, start, end in self._cuda_records:
            totals[name] = totals.get(name, 0.0) + start.elapsed_time(end)
        for name, t0, t1 in self._wall_records:
            totals[name] = totals.get(name, 0.0) + 1000.0 * (t1 - t0)
        return totals
