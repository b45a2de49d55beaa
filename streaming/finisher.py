"""The finisher: a second thread that decodes, copies to the host and delivers a UNet call's frames while the
model worker goes on with the next turn (audio features, next UNet call).

Bounded: `submit` waits while `depth` batches are handed over and not finished (1 by default: the worker is at
most one call ahead of what sessions have received), so latency cannot creep and memory stays bounded. One
thread, first in first out: a session's frames arrive in the order its chunks were made. On CUDA the work runs
on a side stream that first waits for the UNet call's event, so the decode is queued behind that call without the
finisher waiting for the whole device, and the host copy waits for its own event only (`device.to_host`).

Why CUDA only by default (`EngineConfig.pipelined`): on a GPU the worker thread launches work and the device runs
it, so the decode, the host copy and the Python of `deliver` hide behind the next UNet call; on a CPU both threads
compete for the same cores, and the overlap buys little (docs/streaming.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .cost_model import Span
from .device import bind_thread

log = logging.getLogger(__name__)

WAIT_S = 0.05  # how often a waiting `submit` or `drain` looks at the clock and the stop flag


@dataclass
class Mark:
    """A point in the work of the current stream: a CUDA event on CUDA devices (its time is when the device got
    there), the wall clock elsewhere (where work is done when the call returns)."""

    wall: float
    event: torch.cuda.Event | None = None


class DeviceClock:
    """Marks and spans of device work, so that a call's cost is its device time on CUDA without synchronising."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._origin = self.mark() if self.cuda else None  # spans on CUDA: seconds since this event

    def at(self, mark: Mark) -> float:
        """Seconds of `mark` on this clock (on CUDA: waits until the device has passed it)."""
        if self._origin is None or self._origin.event is None or mark.event is None:
            return mark.wall
        mark.event.synchronize()
        return float(self._origin.event.elapsed_time(mark.event)) / 1000.0

    def span(self, start: Mark, end: Mark) -> Span:
        return Span(self.at(start), self.at(end))

    def mark(self) -> Mark:
        if not self.cuda:
            return Mark(time.perf_counter())
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # this thread's stream on the model's device
        return Mark(time.perf_counter(), event)

    @staticmethod
    def seconds(start: Mark, end: Mark) -> float:
        """Seconds from `start` to `end` (on CUDA: waits until the device has passed `end`)."""
        if start.event is None or end.event is None:
            return end.wall - start.wall
        end.event.synchronize()
        return float(start.event.elapsed_time(end.event)) / 1000.0


@dataclass
class _Work:
    run: Callable[[], None]
    ready: Mark  # the UNet call's output is ready on the device once it is passed


class Finisher:
    """Runs handed-over work in order on its own thread (started on the first `submit`), at most `depth` at once
    handed over and not finished."""

    def __init__(self, device: torch.device, depth: int = 1, name: str = "vexpress-finisher"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.device = torch.device(device)
        self.depth = depth
        self.name = name
        self._cond = threading.Condition()
        self._queue: deque[_Work] = deque()
        self._in_flight = 0  # submitted and not finished (queued + the one running)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # high priority: the decode of frames sessions wait for goes before the next UNet call's kernels
        self._stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self.errors = 0  # work that raised (the worker's own work catches what it can; this is the last guard)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def submit(self, run: Callable[[], None], ready: Mark, timeout: float = 60.0) -> bool:
        """Hand `run` over; waits (bounded by `timeout`) while `depth` are in flight. False when it was not taken:
        the finisher is stopping, or stayed full for `timeout` (then the caller runs nothing: the batch is lost,
        which only a stuck device would cause)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight >= self.depth and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("finisher full for %.0f s: a batch of frames is dropped", timeout)
                    return False
                self._cond.wait(min(WAIT_S, left))
            if self._stopping:
                return False
            self._queue.append(_Work(run, ready))
            self._in_flight += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until everything handed over is finished (bounded). Whether it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight and time.monotonic() < deadline:
                self._cond.wait(WAIT_S)
            return self._in_flight == 0

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what was handed over (at most `depth` batches; sessions closed meanwhile drop their frames),
        then end the thread. A later `submit` starts a new one."""
        with self._cond:
            thread = self._thread
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("finisher thread did not end within %.0f s", timeout)
        with self._cond:
            self._thread = None
            self._stopping = False

    def _loop(self) -> None:
        bind_thread(self.device)  # its events, copies and allocations on the engine's device, not cuda:0
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait(WAIT_S)
                if not self._queue:  # stopping and drained
                    return
                work = self._queue.popleft()
            try:
                with self._on_stream(work.ready):
                    work.run()
            except Exception:  # never let one batch kill the thread that finishes everybody's frames
                self.errors += 1
                log.exception("finisher: a batch failed")
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()

    @contextmanager
    def _on_stream(self, ready: Mark) -> Iterator[None]:
        """On CUDA: the side stream, queued behind the UNet call's event (the device orders them, no host wait)."""
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            if ready.event is not None:
                self._stream.wait_event(ready.event)
            yield
