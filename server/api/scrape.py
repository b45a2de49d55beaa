"""The `/metrics` figures read from the server's state at each scrape: sessions, pumps, `engine.stats()`, and the
engine's records that feed the histograms of `metrics.ServerMetrics`."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import metrics
from .state import ServerState

PREFIX = metrics.PREFIX


def metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower()


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc)
    family.add_metric([], value)
    return family


class StateCollector(Collector):
    """Everything read from the server's state at scrape time (the server's event loop thread)."""

    def __init__(self, state: ServerState):
        self.state, self.metrics = state, state.metrics

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time: nothing to check for clashes at registration

    def collect(self) -> Iterator[Metric]:
        state = self.state
        sessions = list(state.sessions)
        pumps = [s.pump for s in sessions]
        for session in sessions:
            self.metrics.observe_latencies(session.engine_session)
        self.metrics.observe_compute(state.engine.compute_spans())
        self.metrics.observe_turns(state.engine.turn_spans())
        engine_stats = state.engine_stats()
        depths = [d for p in pumps for d in p.queue_depths()]
        yield _gauge("sessions", "Sessions being served.", len(sessions))
        yield _gauge("sessions_max", "Sessions the server admits at once (--max_sessions).", state.config.max_sessions)
        yield _counter("sessions_created_total", "Sessions created.", state.sessions.created_total)
        yield _counter(
            "sessions_refused_total", "Session requests refused at capacity (503).", state.sessions.refused_total
        )
        yield _gauge(
            "peer_connections",
            "WebRTC peer connections (publishers and WHEP viewers).",
            sum(len(s.peers) for s in sessions),
        )
        yield _gauge("avatars", "Registered avatars.", state.avatar_count())
        yield _counter(
            "frames_sent_total", "Frames read from the engine and sent to the tracks.", sum(p.frames for p in pumps)
        )
        yield _gauge(
            "fps",
            "Measured output frame rate of each session, averaged over sessions.",
            sum(p.measured_fps for p in pumps) / len(pumps) if pumps else 0.0,
        )
        yield _counter(
            "pacing_late_frames_total",
            "Frames read more than one period after they were due.",
            sum(p.late_frames for p in pumps),
        )
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Frames waiting in the per-track queues.", labels=["stat"])
        depth.add_metric(["sum"], sum(depths))
        depth.add_metric(["max"], max(depths, default=0))
        yield depth
        dropped = CounterMetricFamily(PREFIX + "dropped_frames_total", "Frames dropped, by where.", labels=["stage"])
        dropped.add_metric(["track_queue"], sum(p.dropped for p in pumps))
        dropped.add_metric(["engine"], engine_stats.get("dropped_frames", 0))
        yield dropped
        latency = GaugeMetricFamily(
            PREFIX + "latency_ms",
            "Audio pushed to frame ready, engine-wide percentiles of recent frames (ms).",
            labels=["quantile"],
        )
        for q, key in (("0.5", "latency_p50_ms"), ("0.95", "latency_p95_ms")):
            if isinstance(engine_stats.get(key), (int, float)):
                latency.add_metric([q], engine_stats[key])
        if latency.samples:
            yield latency
        shown = {"dropped_frames", "latency_p50_ms", "latency_p95_ms", "sessions", "avatars"}
        for key, value in sorted(engine_stats.items()):
            if key not in shown and isinstance(value, (int, float)) and not isinstance(value, bool):
                yield _gauge(f"engine_{metric_name(key)}", f"Engine figure {key!r}.", value)
        yield from _device_metrics(state)
        yield _gauge("process_threads", "Threads of the server process.", threading.active_count())
        try:
            yield _gauge("event_loop_tasks", "Asyncio tasks on the server's event loop.", metrics.loop_tasks())
        except RuntimeError:  # not scraped from a running loop
            pass


def _device_metrics(state: ServerState) -> Iterator[Metric]:
    """Per device of the pool (--devices), labelled `device`: what placement and failover read."""
    devices = state.engine.status()
    families = {
        "device_healthy": ("1 while the device's model worker serves, 0 once it failed.", lambda d: d.healthy),
        "device_ready": ("1 while the device admits one more session.", lambda d: d.healthy and d.admits),
        "device_sessions": ("Sessions on the device.", lambda d: d.sessions),
        "device_estimated_load": (
            "Fraction of the device worker's time its sessions take (measured cost model).",
            lambda d: d.estimated_load,
        ),
        "device_headroom": (
            "Real-time margin left with one more default session (negative: it would be refused).",
            lambda d: d.headroom,
        ),
        "device_busy_fraction": ("Fraction of the last 10 s the device's worker computed.", lambda d: d.busy_fraction),
        "device_frames_generated": ("Frames the device's worker generated.", lambda d: d.frames_generated),
        "device_worker_errors": ("Sessions the device's worker failed.", lambda d: d.worker_errors),
        "device_simulated": (
            "1 when the device is simulated from a GPU profile (sim:<profile>): no model runs, frames are marked.",
            lambda d: d.simulated,
        ),
    }
    for name, (doc, read) in families.items():
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["device"])
        for device in devices:
            value = read(device)
            if value is not None:
                family.add_metric([device.name], float(value))
        yield family
