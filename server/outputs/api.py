"""A session's outputs over HTTP, and their `/metrics`.

| method, path | what |
|---|---|
| `POST /v1/sessions/{id}/outputs` | push the session to an output (body below): 201 + Location |
| `GET /v1/sessions/{id}/outputs` | every output's state, bitrate, counters (also in `GET /v1/sessions/{id}`) |
| `DELETE /v1/sessions/{id}/outputs/{output}` | stop it: 200 with its last report |
| `POST /v1/sessions` with `"outputs": [...]` | the session is pushed from its creation |

Body: `{"url", "video_bitrate_kbps" (2500 up to 1280x720, more for larger frames:
`target.default_video_kbps`), "audio_bitrate_kbps" (128), "keyframe_interval_s" (2), "token"
(WHIP bearer), "tls_verify" (true: rtmps:// and whip+https:// check the certificate; false for a self-signed test
ingest)}`. URLs: `rtmp://`, `rtmps://`, `srt://` (when PyAV's FFmpeg has libsrt; else 400) and `whip+http(s)://`
(WHIP).
Reports never show a URL's stream key (the last path segment), query or credentials.

Who may add one: `--outputs on` (default: any session token holder), `api-key` (requests with an API key only:
403 `outputs_need_api_key`), `off` (403 `outputs_disabled`). Where to: the outbound policy (server/access/outbound.py)
checks the target when it is added (400 `target_not_allowed`) and again at each connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

from aiohttp import web
from aiortc import RTCConfiguration
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..access.auth import has_api_key
from ..access.outbound import OutboundPolicy, OutboundRefused
from ..api.session_features import SessionFeature
from ..api.state import STATE, json_body, session_for
from ..errors import ApiError
from ..metrics import PREFIX
from ..session.served import ServerSession
from ..settings.config import ServerConfig
from ..webrtc import peer as rtc
from .ingest import IngestPublisher
from .publisher import Publisher
from .target import OutputSettings
from .whip import WhipPublisher

MAX_OUTPUTS = 4  # per session


# The outputs' counters: (metric name, help, one publisher's value). Totals over every output ever run: those of
# outputs removed or closed with their session are kept (OutputStore.retired), so that a counter never goes down.
COUNTERS: tuple[tuple[str, str, Callable[[Publisher], int]], ...] = (
    ("output_frames_sent_total", "Frames the outputs sent.", lambda p: p.figures.frames_sent),
    (
        "output_frames_dropped_total",
        "Frames outputs dropped: the ingest was slower than real time.",
        lambda p: p.dropped_frames,
    ),
    (
        "output_frames_skipped_total",
        "Frames that passed while an output was disconnected.",
        lambda p: p.figures.frames_skipped,
    ),
    (
        "output_reconnects_total",
        "Times an output's ingest dropped and it reconnected.",
        lambda p: p.figures.reconnects,
    ),
)


class OutputStore:
    """Every session's outputs, by session id; a session's go when it closes."""

    def __init__(self, config: ServerConfig, rtc_config: RTCConfiguration | None = None) -> None:
        self.config = config
        self.policy = OutboundPolicy.from_texts(config.output_allow)
        self.rtc_config = rtc_config  # WHIP peer connections: the server's ICE servers
        self.outputs: dict[str, dict[str, Publisher]] = {}
        self.stopped_total = 0
        self.retired: dict[str, int] = {}  # COUNTERS of outputs removed or closed with their session

    def check_caller(self, request: web.Request) -> None:
        """The operator's switch (--outputs): 403 when this request may not add outputs."""
        if self.config.outputs == "off":
            raise ApiError(403, "live outputs are turned off on this server (--outputs off)", code="outputs_disabled")
        if self.config.outputs == "api-key" and not has_api_key(request, self.config.api_key):
            raise ApiError(
                403,
                "on this server only API-key holders may add outputs (--outputs api-key); "
                "a session token is not enough",
                code="outputs_need_api_key",
            )

    async def check_target(self, settings: OutputSettings) -> None:
        """400 `target_not_allowed` unless the outbound policy allows the target now."""
        try:
            await self.policy.resolve(settings.host, settings.port)
        except OutboundRefused:
            raise ApiError(
                400,
                f"output target {settings.shown_url()!r} is not allowed: it does not resolve to a public address "
                "(loopback, private, link-local, CGNAT, multicast and reserved addresses are refused unless the "
                "operator allows them with --output-allow)",
                code="target_not_allowed",
            ) from None

    def of(self, session_id: str) -> list[Publisher]:
        return list(self.outputs.get(session_id, {}).values())

    def add(self, session: ServerSession, settings: OutputSettings) -> Publisher:
        mine = self.outputs.setdefault(session.id, {})
        if len(mine) >= MAX_OUTPUTS:
            raise ApiError(
                409, f"this session has {len(mine)} outputs already (at most {MAX_OUTPUTS})", code="conflict"
            )
        output_id = uuid.uuid4().hex[:10]
        publisher: Publisher = (
            WhipPublisher(output_id, session, settings, self.policy, self.rtc_config, self.config.max_sdp_bytes)
            if settings.whip
            else IngestPublisher(output_id, session, settings, self.policy)
        )
        mine[output_id] = publisher
        publisher.start()
        session.connected_once.set()  # an output is a viewer: the session is in use
        session.log.info("output %s: %s", output_id, settings.shown_url())
        return publisher

    async def remove(self, session_id: str, output_id: str) -> Publisher | None:
        publisher = self.outputs.get(session_id, {}).pop(output_id, None)
        if publisher is not None:
            await publisher.stop()
            self.stopped_total += 1
            self._retire([publisher])
        return publisher

    def _retire(self, publishers: list[Publisher]) -> None:
        for name, _, value in COUNTERS:
            self.retired[name] = self.retired.get(name, 0) + sum(value(p) for p in publishers)

    def forget(self, session: ServerSession) -> None:
        """The session closed (its tasks, the publishers', are cancelled by its close)."""
        gone = list(self.outputs.pop(session.id, {}).values())
        self.stopped_total += len(gone)
        self._retire(gone)


OUTPUTS = web.AppKey("outputs", OutputStore)


def setup(app: web.Application) -> None:
    state = app[STATE]
    store = app[OUTPUTS] = OutputStore(state.config, rtc.rtc_configuration(state.config.ice_server))
    state.sessions.add_close_listener(store.forget)
    state.metrics.registry.register(OutputCollector(store))


async def check_request(request: web.Request, settings: list[OutputSettings]) -> None:
    """May this request add these outputs (the switch, then each target)? ApiError if not."""
    store = request.app[OUTPUTS]
    store.check_caller(request)
    for one in settings:
        await store.check_target(one)


async def _check_pushes(request: web.Request, pushes: object) -> list[OutputSettings]:
    """`POST /v1/sessions` with `"outputs"`: pushed from the start, checked before the session opens."""
    if pushes is None:
        return []
    if not isinstance(pushes, list) or len(pushes) > MAX_OUTPUTS:
        raise ApiError(400, f"outputs must be a list of at most {MAX_OUTPUTS} outputs")
    settings = [OutputSettings.from_json(o) for o in pushes]
    if settings:
        await check_request(request, settings)
    return settings


async def _start_pushes(request: web.Request, session: ServerSession, settings: list[OutputSettings]) -> dict:
    if not settings:
        return {}
    return {"outputs": [request.app[OUTPUTS].add(session, one).report() for one in settings]}


def _shown(app: web.Application, session: ServerSession) -> dict:
    """What `GET /v1/sessions/{id}` shows of the session's outputs."""
    return {"outputs": [p.report() for p in app[OUTPUTS].of(session.id)]}


SESSION_FEATURE = SessionFeature("outputs", "outputs", _check_pushes, _start_pushes, _shown)


async def add_output(request: web.Request) -> web.Response:
    session = session_for(request)
    request.app[OUTPUTS].check_caller(request)
    settings = OutputSettings.from_json(await json_body(request))
    await check_request(request, [settings])
    publisher = request.app[OUTPUTS].add(session, settings)
    location = f"/v1/sessions/{session.id}/outputs/{publisher.id}"
    return web.json_response(publisher.report(), status=201, headers={"Location": location})


async def list_outputs(request: web.Request) -> web.Response:
    session = session_for(request)
    return web.json_response(_shown(request.app, session))


async def delete_output(request: web.Request) -> web.Response:
    session = session_for(request)
    publisher = await request.app[OUTPUTS].remove(session.id, request.match_info["output_id"])
    if publisher is None:
        raise ApiError(404, f"no output {request.match_info['output_id']!r} on this session")
    return web.json_response(publisher.report())


class OutputCollector(Collector):
    """`vexpress_outputs{kind,state}`, `vexpress_output_bitrate_bps{kind}` and the counters: no session or output
    ids (they are secrets, and /metrics needs no credential)."""

    def __init__(self, store: OutputStore):
        self.store = store

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        publishers = [p for outputs in self.store.outputs.values() for p in outputs.values()]
        states = GaugeMetricFamily(
            PREFIX + "outputs", "Session outputs (RTMP/SRT/WHIP pushes), by state.", labels=["kind", "state"]
        )
        counts: dict[tuple[str, str], int] = {}
        for p in publishers:
            counts[(p.kind, p.state)] = counts.get((p.kind, p.state), 0) + 1
        for (kind, state), n in sorted(counts.items()):
            states.add_metric([kind, state], n)
        yield states
        # By kind only: session and output ids are secrets (SECURITY.md) and /metrics is public.
        bitrate = GaugeMetricFamily(
            PREFIX + "output_bitrate_bps",
            "Bits a second the outputs of a kind sent over the last 5 s, summed.",
            labels=["kind"],
        )
        rates: dict[str, float] = {}
        for p in publishers:
            rates[p.kind] = rates.get(p.kind, 0.0) + p.bitrate_bps
        for kind, bps in sorted(rates.items()):
            bitrate.add_metric([kind], bps)
        yield bitrate
        for name, doc, value in COUNTERS:
            family = CounterMetricFamily(PREFIX + name, doc)
            family.add_metric([], sum(value(p) for p in publishers) + self.store.retired.get(name, 0))
            yield family
