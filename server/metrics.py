"""`GET /metrics`: Prometheus text format (version 0.0.4), written by hand from one snapshot of the server."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "vexpress_"


@dataclass
class Metric:
    name: str
    kind: str  # gauge | counter
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, float(value)))
        return self


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def render(metrics: list[Metric]) -> str:
    lines = []
    for m in metrics:
        name = PREFIX + m.name
        lines.append(f"# HELP {name} {m.help}")
        lines.append(f"# TYPE {name} {m.kind}")
        for labels, value in m.samples:
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower()


def collect(app_state) -> list[Metric]:
    """Everything `/metrics` shows, from the registry of sessions, their pumps and the engine's figures."""
    sessions = list(app_state.sessions)
    pumps = [s.pump for s in sessions]
    engine_stats = app_state.engine_stats()
    depths = [d for p in pumps for d in p.queue_depths()]
    out = [
        Metric("sessions", "gauge", "Sessions being served.").add(len(sessions)),
        Metric("sessions_max", "gauge", "Sessions the server admits at once (--max_sessions).").add(
            app_state.config.max_sessions
        ),
        Metric("sessions_created_total", "counter", "Sessions created.").add(app_state.sessions.created_total),
        Metric("sessions_refused_total", "counter", "Session requests refused at capacity (503).").add(
            app_state.sessions.refused_total
        ),
        Metric("peer_connections", "gauge", "WebRTC peer connections (publishers and WHEP viewers).").add(
            sum(len(s.peers) for s in sessions)
        ),
        Metric("avatars", "gauge", "Registered avatars.").add(app_state.avatar_count()),
        _sockets_refused(app_state),
        Metric("frames_sent_total", "counter", "Frames read from the engine and sent to the tracks.").add(
            sum(p.frames for p in pumps)
        ),
        Metric("fps", "gauge", "Measured output frame rate of each session, averaged over sessions.").add(
            sum(p.measured_fps for p in pumps) / len(pumps) if pumps else 0.0
        ),
        Metric("pacing_late_frames_total", "counter", "Frames read more than one period after they were due.").add(
            sum(p.late_frames for p in pumps)
        ),
        Metric("queue_depth", "gauge", "Frames waiting in the per-track queues.")
        .add(sum(depths), stat="sum")
        .add(max(depths, default=0), stat="max"),
        Metric("dropped_frames_total", "counter", "Frames dropped, by where.")
        .add(sum(p.dropped for p in pumps), stage="track_queue")
        .add(engine_stats.get("dropped_frames", 0), stage="engine"),
    ]
    latency = Metric("latency_ms", "gauge", "Audio pushed to frame ready, engine-wide percentiles (ms).")
    for q, key in (("0.5", "latency_p50_ms"), ("0.95", "latency_p95_ms")):
        if isinstance(engine_stats.get(key), (int, float)):
            latency.add(engine_stats[key], quantile=q)
    if latency.samples:
        out.append(latency)
    shown = {"dropped_frames", "latency_p50_ms", "latency_p95_ms", "sessions", "avatars"}
    for key, value in sorted(engine_stats.items()):
        if key not in shown and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(Metric(f"engine_{metric_name(key)}", "gauge", f"Engine figure {key!r}.").add(value))
    from .procstats import metrics as process_metrics  # memory, fds, threads, tasks: what a leak shows in

    return out + process_metrics()


def _sockets_refused(app_state) -> Metric:
    metric = Metric("websockets_refused_total", "counter", "Websockets refused at a per-session limit (429).")
    for kind, count in sorted(app_state.sockets_refused.items()):
        metric.add(count, kind=kind)
    return metric
