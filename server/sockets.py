"""What the server's websockets share: the per-session socket limits, the set of open
sockets closed at shutdown (aiohttp waits for every handler to return), a thread pool for frame encoding, and the
JSON envelope of engine events."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import WSCloseCode, web

from streaming.frames import Event

from .errors import ApiError
from .sessions import ServerSession
from .state import server_state

log = logging.getLogger("server.ws")

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
                429, f"this session has {counts[kind]} {kind} websockets open already (at most {limit})",
                code="socket_limit",
            )
        counts[kind] += 1
        self._counts, self._kind = counts, kind

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._counts[self._kind] -= 1


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
