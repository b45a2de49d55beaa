"""`GET /metrics` with `prometheus-client`: one `CollectorRegistry` per app (tests start several apps in a process).

What it holds:
* the server's figures, read by `scrape.StateCollector` from the session registry, the pumps and `engine.stats()`
  at each scrape (`vexpress_sessions`, `vexpress_fps`, `vexpress_latency_ms{quantile}`, `vexpress_engine_*`...);
* histograms, so that percentiles can be computed across servers: `vexpress_audio_to_frame_seconds` (audio pushed
  to frame ready, every frame), `vexpress_engine_compute_seconds` (each span of model compute the engine's worker
  logs: a session's audio features, a batch's denoising and decoding), `vexpress_engine_turn_seconds` (each turn of
  the worker: what a session waits between two chunks when every session has work)
  and `vexpress_track_queue_depth_frames` (a track's queue when a frame is put in it);
* the process: the library's process collector (`vexpress_process_resident_memory_bytes`,
  `vexpress_process_open_fds`, CPU, ...), plus threads and event-loop tasks: what a leak shows in.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
PREFIX = "vexpress_"
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
TURN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
DEPTH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
_PROCESS = ProcessCollector(namespace="vexpress", registry=None)  # reads /proc on Linux; nothing elsewhere


class ServerMetrics:
    """One app's registry: the counters and histograms handlers update, and a collector reading the rest."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.websockets_refused = Counter(
            "vexpress_websockets_refused",
            "Websockets refused at a per-session limit (429).",
            ["kind"],
            registry=self.registry,
        )
        self.websocket_messages_limited = Counter(
            "vexpress_websocket_messages_limited",
            "Websocket messages dropped over the per-connection rate (--max_ws_messages_per_s).",
            ["kind"],
            registry=self.registry,
        )
        self.websockets_rate_closed = Counter(
            "vexpress_websockets_rate_closed",
            "Websockets closed (1008) for flooding past the message rate.",
            ["kind"],
            registry=self.registry,
        )
        self.control_changes_limited = Counter(
            "vexpress_control_changes_limited",
            "Live control changes refused over a session's rate (--max_control_changes_per_s), by transport.",
            ["via"],
            registry=self.registry,
        )
        self.audio_to_frame = Histogram(
            "vexpress_audio_to_frame_seconds",
            "Audio pushed to frame ready, per frame.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.engine_compute = Histogram(
            "vexpress_engine_compute_seconds",
            "Model compute spans of the engine's worker: one session's audio features, or one batch's denoise+decode.",
            buckets=TURN_BUCKETS_S,
            registry=self.registry,
        )
        self.engine_turn = Histogram(
            "vexpress_engine_turn_seconds",
            "Turns of the engine's worker: every session's next chunk (audio features, batched UNet calls, decodes).",
            buckets=TURN_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_depth = Histogram(
            "vexpress_track_queue_depth_frames",
            "Frames waiting in a track's queue when a frame is put in it.",
            buckets=DEPTH_BUCKETS,
            registry=self.registry,
        )
        self._latency_seen: dict[str, int] = {}  # engine session id -> latencies observed
        self._compute_seen = 0.0  # end of the last model compute span observed
        self._turn_seen = 0.0  # end of the last worker turn observed

    def attach(self, collector: Collector) -> None:
        """Read the server at each scrape through `collector` (server/api/scrape.py), with the process collector."""
        self.registry.register(collector)
        self.registry.register(_PROCESS)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- histograms fed from the engine's records (at scrape time and when a session ends) -----------------------
    def observe_latencies(self, engine_session: Any) -> None:
        """The frames' latencies the engine recorded for this session since the last call."""
        seen = self._latency_seen.get(engine_session.id, 0)
        recent = list(engine_session.latencies_ms)
        new = min(engine_session.latency_count - seen, len(recent))
        for ms in recent[len(recent) - new :] if new > 0 else ():
            self.audio_to_frame.observe(ms / 1000.0)
        self._latency_seen[engine_session.id] = engine_session.latency_count

    def forget(self, engine_session: Any) -> None:
        self.observe_latencies(engine_session)
        self._latency_seen.pop(engine_session.id, None)

    def observe_compute(self, spans: Iterable[tuple[float, float]]) -> None:
        """The worker's model compute spans `(start, end)` (monotonic) that ended after the last call."""
        self._compute_seen = _observe_new(self.engine_compute, spans, self._compute_seen)

    def observe_turns(self, spans: Iterable[tuple[float, float]]) -> None:
        """The worker's turns `(start, end)` (monotonic) that ended after the last call."""
        self._turn_seen = _observe_new(self.engine_turn, spans, self._turn_seen)


def _observe_new(histogram: Histogram, spans: Iterable[tuple[float, float]], seen: float) -> float:
    """Observe the durations of the spans that ended after `seen`; the new `seen`."""
    last = seen
    for start, end in list(spans):
        if end > seen:
            histogram.observe(max(0.0, end - start))
            last = max(last, end)
    return last


# -- process figures (also reported by `vexpress-rt soak`) -------------------------------------------------------
def loop_tasks(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Tasks not done on `loop` (default: the running one). Call it from that loop's thread."""
    loop = loop or asyncio.get_running_loop()
    return sum(1 for t in asyncio.all_tasks(loop) if not t.done())


def process_figures() -> dict[str, float]:
    """The process collector's samples by name (`process_resident_memory_bytes`, `process_open_fds`, ...);
    empty where the platform has no /proc."""
    return {s.name.removeprefix(PREFIX): s.value for family in _PROCESS.collect() for s in family.samples}


def snapshot(loop: asyncio.AbstractEventLoop | None = None) -> dict:
    """Memory, file descriptors, threads and tasks now: what growth over a soak run shows a leak in."""
    figures = process_figures()
    fds = figures.get("process_open_fds")
    return {
        "rss_mb": round(figures.get("process_resident_memory_bytes", 0) / 2**20, 1),
        "open_fds": None if fds is None else int(fds),
        "threads": threading.active_count(),
        "tasks": loop_tasks(loop),
    }
