"""A served session: the engine session plus what the server attached to it, and the registry of them.

A session ends, releasing everything (peer connections closed, pacing task cancelled, engine session closed), on
`DELETE /v1/sessions/{id}`, when its publisher's peer connection fails or closes, when nobody connected within
`connect_timeout_s`, and at shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Iterator

from aiortc import RTCPeerConnection

from streaming.session import StreamSession

from ..access.limits import RequestRate
from ..media.pump import MediaPump

log = logging.getLogger("server.session")

PUBLISHER = "publisher"


class SessionLog(logging.LoggerAdapter):
    """Records carry `session_id` (for structured handlers) and start with `[session <id>]`."""

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {}).update(self.extra)
        return f"[session {self.extra['session_id']}] {msg}", kwargs


class ServerSession:
    """`token`: the session's full credential; `view_token`: its watch-only one (WHEP and the viewer page,
    `view_url`); `control_rate`: how often its live controls may change; `owner`: who the session counts against
    (--max_sessions_per_key); `end_reason`: the engine's error message, when the engine ended the session on its
    own."""

    def __init__(
        self,
        engine_session: StreamSession,
        token: str,
        view_token: str,
        pump: MediaPump,
        logger: SessionLog,
        control_rate: RequestRate,
        owner: str | None = None,
    ):
        self.engine_session = engine_session
        self.owner = owner
        self.started_monotonic = time.monotonic()
        self.last_activity = self.started_monotonic  # the last request with its token or websocket message
        self.end_reason: str | None = None
        self.id: str = engine_session.id
        self.token = token
        self.view_token = view_token
        self.control_rate = control_rate  # live control changes (PATCH, the bot's control messages)
        self.pump = pump
        self.log = logger
        self.created = time.time()
        self.peers: dict[str, RTCPeerConnection] = {}  # "publisher" and WHEP viewer ids
        self.open_sockets: collections.Counter[str] = collections.Counter()  # websockets by kind ("bot", "frames")
        self.connected_once = asyncio.Event()
        self.closed = False
        self.close_reason: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._message_listeners: list[Callable[[dict], None]] = []  # the bot websockets

    def add_message_listener(self, listener: Callable[[dict], None]) -> None:
        """`listener(message)` for each server-side event of this session (a script's progress...); loop thread."""
        self._message_listeners.append(listener)

    def remove_message_listener(self, listener: Callable[[dict], None]) -> None:
        if listener in self._message_listeners:
            self._message_listeners.remove(listener)

    def notify(self, message: dict) -> None:
        """Tell the session's clients (its bot websockets) `message`, a JSON object with a "type"."""
        for listener in list(self._message_listeners):
            listener(message)

    def touch(self) -> None:
        """Something came in for this session (a request with its token, a websocket message)."""
        self.last_activity = time.monotonic()

    def engine_failed(self, message: str | None) -> None:
        """The engine ended this session with an error (`message`): the reason the server session closes."""
        self.end_reason = message

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the session opened."""
        return (time.monotonic() if now is None else now) - self.started_monotonic

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the last input: a request, a websocket message or audio pushed to the engine."""
        now = time.monotonic() if now is None else now
        return now - max(self.last_activity, self.engine_session.last_input)

    def start_task(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def new_viewer_id(self) -> str:
        return uuid.uuid4().hex[:12]

    async def close_peer(self, name: str) -> bool:
        pc = self.peers.pop(name, None)
        if pc is None:
            return False
        await pc.close()
        return True

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.log.info("closing: %s", reason)
        for name in list(self.peers):
            try:
                await self.close_peer(name)
            except Exception:
                self.log.exception("closing peer connection %s failed", name)
        await self.pump.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.engine_session.close()


class SessionRegistry:
    def __init__(self):
        self._sessions: dict[str, ServerSession] = {}
        self.created_total = 0
        self.refused_total = 0
        self.closed_total = 0
        self._on_close: list[Callable[[ServerSession], None]] = []

    def add_close_listener(self, listener: Callable[[ServerSession], None]) -> None:
        """`listener(session)` after each session closed."""
        self._on_close.append(listener)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[ServerSession]:
        return iter(list(self._sessions.values()))

    def add(self, session: ServerSession) -> None:
        self._sessions[session.id] = session
        self.created_total += 1

    def get(self, session_id: str) -> ServerSession | None:
        return self._sessions.get(session_id)

    async def close(self, session_id: str, reason: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self.closed_total += 1
        await session.close(reason)
        for listener in self._on_close:
            listener(session)
        return True

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(self.close(sid, reason) for sid in list(self._sessions)), return_exceptions=True)
