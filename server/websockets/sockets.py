"""What the server's websockets share: the per-session socket limits, the per-connection message rate limit, the
set of open sockets closed at shutdown (aiohttp waits for every handler to return), a thread pool for frame
encoding, and the JSON envelope of engine events."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import WSCloseCode, web

from streaming.frames import Event
from vexpress_rt_client import wire

from ..access.limits import MessageRate, Verdict
from ..api.state import server_state
from ..errors import ApiError
from ..session.served import ServerSession

log = logging.getLogger("server.websockets.bot")

OPEN_SOCKETS = web.AppKey[set[web.WebSocketResponse]]("open_sockets")
ENCODER_POOL = web.AppKey("encoder_pool", ThreadPoolExecutor)


def event_message(event: Event) -> dict:
    """An engine event as a websocket message: `{"type", <its data>, "frame"}` (the output frame it happened at)."""
    return {"type": event.type, **event.data, "frame": event.frame_index}


class SessionSockets:
    """`with SessionSockets(request, session, "frames", limit):` one more websocket of that kind on the session,
    checked and counted before the upgrade's first await (429 `socket_limit` beyond); released when it ends."""

    def __init__(self, request: web.Request, session: ServerSession, kind: str, limit: int):
        counts = session.open_sockets
        if counts[kind] >= limit:
            server_state(request).metrics.websockets_refused.labels(kind=kind).inc()
            raise ApiError(
                429,
                f"this session has {counts[kind]} {kind} websockets open already (at most {limit})",
                code="socket_limit",
            )
        counts[kind] += 1
        self._counts, self._kind = counts, kind

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._counts[self._kind] -= 1


class MessageLimit:
    """The message rate limit of one websocket connection (`limits.MessageRate`), counted in `/metrics`
    (`vexpress_websocket_messages_limited_total{kind}`, `vexpress_websockets_rate_closed_total{kind}`), with the
    `error` event to send: at the first dropped message, then at most once a second, and when closing."""

    TELL_EVERY_S = 1.0

    def __init__(self, request: web.Request, kind: str, per_s: float):
        self.rate = MessageRate(per_s)
        metrics = server_state(request).metrics
        self._dropped = metrics.websocket_messages_limited.labels(kind=kind)
        self._closed = metrics.websockets_rate_closed.labels(kind=kind)
        self._told_at: float | None = None

    @property
    def dropped(self) -> int:
        return self.rate.dropped

    def check(self) -> tuple[Verdict, dict | None]:
        """Whether to handle this message, and the `error` event to send the client first (or None)."""
        verdict = self.rate.check()
        if verdict is Verdict.ACCEPT:
            return verdict, None
        self._dropped.inc()
        if verdict is Verdict.CLOSE:
            self._closed.inc()
            return verdict, self._error(f"{self.rate.dropped} messages over the limit: closing the connection")
        now = self.rate.clock()
        if self._told_at is not None and now - self._told_at < self.TELL_EVERY_S:
            return verdict, None
        self._told_at = now
        return verdict, self._error(
            f"message dropped ({self.rate.dropped} so far); send fewer, larger messages (audio: 20 ms or more each) "
            "or the connection will be closed"
        )

    def _error(self, detail: str) -> dict:
        return {"type": wire.ERROR, "code": "rate_limited", "message": f"{self.rate.describe()}: {detail}"}


class Tracked:
    """`async with Tracked(app, ws):` keeps `ws` in the set that shutdown closes."""

    def __init__(self, app: web.Application, ws: web.WebSocketResponse):
        self._sockets, self._ws = app[OPEN_SOCKETS], ws

    async def __aenter__(self) -> web.WebSocketResponse:
        self._sockets.add(self._ws)
        return self._ws

    async def __aexit__(self, *exc) -> None:
        self._sockets.discard(self._ws)


def setup(app: web.Application) -> None:
    app[OPEN_SOCKETS] = set()
    app[ENCODER_POOL] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frame-encode")
    app.on_shutdown.append(_close_sockets)
    app.on_cleanup.append(_release_pool)


async def _close_sockets(app: web.Application) -> None:
    open_sockets = app[OPEN_SOCKETS]
    sockets = list(open_sockets)
    if sockets:
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down") for ws in sockets),
            return_exceptions=True,
        )


async def _release_pool(app: web.Application) -> None:
    app[ENCODER_POOL].shutdown(wait=False, cancel_futures=True)
