"""`bench --loop_lag`: how late an asyncio event loop runs while the model worker is saturated.

The server's event loop (websockets, RTP pacing, the audio track) shares the process with the worker thread; an
eager, launch-bound UNet holds the GIL for most of each call. This feeds sessions speech as fast as they take it
(the worker never idles) and meanwhile runs a loop that wakes every 10 ms (uvloop when installed, as the server
runs) and records how late each wake-up came, plus the same loop with the worker idle, as the baseline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np

from ..engine import Engine
from ..session import SessionConfig
from .speech import speech

TICK_S = 0.010


async def _lateness(seconds: float) -> list[float]:
    late = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await asyncio.sleep(TICK_S)
        late.append(1000 * (time.perf_counter() - t0 - TICK_S))
    return late


def _run_loop(seconds: float) -> list[float]:
    try:
        import uvloop

        return uvloop.run(_lateness(seconds))
    except ImportError:
        return asyncio.run(_lateness(seconds))


def _figures(late: list[float]) -> dict[str, Any]:
    a = np.array(late) if late else np.zeros(1)
    return {
        "ticks": len(late),
        "lag_p50_ms": float(np.percentile(a, 50)),
        "lag_p95_ms": float(np.percentile(a, 95)),
        "lag_p99_ms": float(np.percentile(a, 99)),
        "lag_max_ms": float(a.max()),
    }


def loop_lag(
    engine: Engine, avatar_id: str, cfg: SessionConfig, sessions: int = 2, seconds: float = 5.0
) -> dict[str, Any]:
    """Event-loop lateness with the worker idle, then saturated by `sessions` sessions (bounded: `seconds` each)."""

    idle = _figures(_run_loop(min(seconds, 2.0)))
    opened = [engine.open_session(avatar_id, cfg.with_params(seed=cfg.params.seed + i)) for i in range(sessions)]
    stop = threading.Event()
    pcm = speech(4.0)

    def feed() -> None:  # keep every session's queue full: more audio whenever it has less than 2 s buffered
        while not stop.is_set():
            for s in opened:
                if s.buffered_ms < 2000:
                    s.push_audio(pcm)
                s.read_frame()
            time.sleep(1 / cfg.fps)

    feeder = threading.Thread(target=feed, daemon=True)
    engine.start()
    frames0, start = engine.worker.frames_generated, time.monotonic()
    feeder.start()
    try:
        busy = _figures(_run_loop(seconds))
    finally:
        stop.set()
        feeder.join(timeout=5)
        end = time.monotonic()
        for s in opened:
            s.close()
    busy["worker_busy_fraction"] = engine.worker.compute_between(start, end) / (end - start)
    busy["frames_generated"] = engine.worker.frames_generated - frames0
    return {"sessions": sessions, "seconds": seconds, "worker_idle": idle, "worker_saturated": busy}
