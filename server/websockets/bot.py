"""The voice-bot websocket, `GET /v1/sessions/{id}/ws` (schema: docs/websocket.md).

Client -> server: binary messages are PCM16 little-endian at the session's declared rate and channel count;
text messages are JSON objects with a `type`: `audio.end`, `interrupt`, `mark` {name}, `control` {live fields,
style}, `ping`, `session.close`. Server -> client, JSON: `session.ready`, `playback.started`, `playback.finished`,
`mark`, `state`, `buffer`, `control.accepted` {version, params}, `control.applied` {version}, `pong`, `error`.
A malformed message gets an `error` event and is ignored: the connection and the session go on.
Messages beyond the connection's rate (`--max_ws_messages_per_s`, server/access/limits.py) are dropped with an `error`
event `rate_limited`; a client that keeps flooding is disconnected (1008).

Engine events reach the connection through the session's listener, which fires in whatever thread emitted them
(the pacing task on the event loop, the model worker for errors): they are queued on the loop in order and one
sender task writes them. Connecting starts the session's clock, so the audio plays and its events come with or
without a viewer. Closing the websocket leaves the session open (a bot may reconnect); `session.close` or
`DELETE /v1/sessions/{id}` ends it, which closes the websocket (code 1000).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

from vexpress_rt.errors import InputError
from vexpress_rt.params import shown
from vexpress_rt_client import wire

from ..access.limits import Verdict
from ..api.controls import apply_control, control_rate_refusal
from ..api.state import server_state, session_for
from .sockets import MessageLimit, SessionSockets, Tracked, event_message

BUFFER_TICK_S = 0.1  # `buffer` is sent at most this often while audio is buffered, and once when it reaches 0
MAX_AUDIO_MESSAGE = 1 << 20  # default bytes of PCM in one message (--max_ws_message_bytes); larger: an error event
MAX_TEXT_MESSAGE = 1 << 16
MAX_FRAME = 4 << 20  # at least: beyond 4x the message limit, the websocket layer itself closes (1009)
MAX_MARK_NAME = 256
MAX_PENDING_EVENTS = 2000  # a client that stops reading its events is disconnected (1008)
HEARTBEAT_S = 20.0
FLUSH_BEFORE_CLOSE_S = 1.0  # closing for a policy reason: how long the queued events (the error) may take to go out


@dataclass(frozen=True)
class _Close:
    """Queued after the last event: the sender closes the websocket with this code."""

    code: WSCloseCode
    reason: bytes


_CLOSE = _Close(WSCloseCode.OK, b"session closed")
_RATE_CLOSE = _Close(WSCloseCode.POLICY_VIOLATION, b"message rate limit")


class BotConnection:
    def __init__(
        self,
        request: web.Request,
        session,
        ws: web.WebSocketResponse,
        max_audio: int = MAX_AUDIO_MESSAGE,
        rate: MessageLimit | None = None,
    ):
        self.request = request
        self.max_audio = max_audio
        self.rate = rate
        self.session = session
        self.engine_session = session.engine_session
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._overflow = False
        self._sender_task: asyncio.Task | None = None
        self._dropping: asyncio.Task | None = None
        self.errors = 0

    # -- out -------------------------------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        """Queue a message (loop thread only)."""
        if self._overflow:
            return
        if self._queue.qsize() >= MAX_PENDING_EVENTS:
            self._overflow = True
            self._dropping = self.loop.create_task(self._drop_connection())
            return
        self._queue.put_nowait(message)

    async def _drop_connection(self) -> None:
        """The client stopped reading (its sends are stuck on a full socket): stop sending and hang up."""
        if self._sender_task is not None:
            self._sender_task.cancel()
        try:
            await asyncio.wait_for(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"events not read"), 5)
        except Exception:
            if self.request.transport is not None:
                self.request.transport.abort()

    def error(self, code: str, message: str) -> None:
        self.errors += 1
        self.send(wire.message(wire.ERROR, code=code, message=message))

    def _on_event(self, event) -> None:
        """The session's listener: any thread."""
        message = event_message(event)
        if threading.get_ident() == self._loop_thread:
            self._deliver(message)
        else:
            try:
                self.loop.call_soon_threadsafe(self._deliver, message)
            except RuntimeError:  # the loop is closed: nobody to tell
                pass

    def _deliver(self, message: dict) -> None:
        self.send(message)
        if message["type"] == wire.STATE and message.get("state") == "closed":
            self._queue.put_nowait(_CLOSE)

    async def _sender(self) -> None:
        while True:
            message = await self._queue.get()
            if isinstance(message, _Close):
                await self.ws.close(code=message.code, message=message.reason)
                return
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))

    async def _buffer_ticker(self, last: float) -> None:
        while True:
            await asyncio.sleep(BUFFER_TICK_S)
            buffered = round(self.engine_session.buffered_ms, 1)
            if buffered != last and (buffered > 0 or last > 0):
                self.send(wire.message(wire.BUFFER, buffered_ms=buffered))
                last = buffered

    def ready_message(self) -> dict:
        es = self.engine_session
        cfg = es.config
        return {
            "type": wire.SESSION_READY,
            "session_id": self.session.id,
            "avatar_id": es.avatar_id,
            "fps": cfg.fps,
            "sample_rate": cfg.input_sample_rate,
            "channels": cfg.input_channels,
            "format": "pcm_s16le",
            "width": es.width,
            "height": es.height,
            "output_sample_rate": cfg.output_sample_rate,
            "state": es.state.value,
            "buffered_ms": round(es.buffered_ms, 1),
        }

    # -- in --------------------------------------------------------------------------------------------------
    def on_audio(self, data: bytes) -> None:
        if len(data) > self.max_audio:
            self.error(
                "message_too_large",
                f"an audio message may hold at most {self.max_audio} bytes, "
                f"got {len(data)}; send smaller chunks (e.g. 20 ms)",
            )
            return
        if not data:
            return
        try:
            self.engine_session.push_audio(data)
        except InputError as exc:
            text = str(exc)
            self.error("buffer_full" if "buffer full" in text else "invalid_audio", text)

    async def on_text(self, text: str) -> None:
        if len(text) > MAX_TEXT_MESSAGE:
            self.error("message_too_large", f"a text message may hold at most {MAX_TEXT_MESSAGE} bytes")
            return
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
            self.error("invalid_json", f"malformed JSON: {str(exc)[:200]}")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.error("invalid_message", 'a text message must be a JSON object with a string "type"')
            return
        kind = message["type"]
        es = self.engine_session
        try:
            if kind == wire.AUDIO_END:
                es.end_utterance()
            elif kind == wire.INTERRUPT:
                es.interrupt()
                self.session.log.info("interrupted by the bot")
            elif kind == wire.MARK:
                name = message.get("name")
                if not isinstance(name, str) or not 0 < len(name) <= MAX_MARK_NAME:
                    self.error("invalid_message", f'"mark" needs a "name": a string of 1 to {MAX_MARK_NAME} characters')
                    return
                es.mark(name)
            elif kind == wire.PING:
                pong = wire.message(wire.PONG)
                if "id" in message:
                    pong["id"] = message["id"]
                self.send(pong)
            elif kind == wire.CONTROL:
                refusal = control_rate_refusal(server_state(self.request), self.session, "ws")
                if refusal is not None:
                    self.error("rate_limited", refusal[0])
                    return
                fields = {k: v for k, v in message.items() if k not in ("type", "id")}
                reply = {"type": wire.CONTROL_ACCEPTED, **apply_control(server_state(self.request), es, fields)}
                if "id" in message:
                    reply["id"] = message["id"]
                self.send(reply)
            elif kind == wire.SESSION_CLOSE:
                await server_state(self.request).sessions.close(self.session.id, "closed by the bot (session.close)")
            else:
                self.error(
                    "unknown_type",
                    f"unknown message type {shown(kind)}; expected {', '.join(wire.CLIENT_MESSAGES)}",
                )
        except InputError as exc:
            self.error("invalid_message", str(exc))

    # -- the connection -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        es = self.engine_session
        ready = self.ready_message()
        self.send(ready)
        es.add_listener(self._on_event)
        self.session.add_message_listener(self.send)  # server-side events (a script's progress)
        sender = self._sender_task = self.loop.create_task(self._sender(), name=f"ws-send-{self.session.id}")
        ticker = self.loop.create_task(self._buffer_ticker(ready["buffered_ms"]), name=f"ws-buffer-{self.session.id}")
        self.session.connected_once.set()
        self.session.pump.start()
        if es.closed or self.session.closed:
            self._queue.put_nowait(_CLOSE)
        flooded = False
        try:
            async for msg in self.ws:
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    if self.rate is not None:
                        verdict, error = self.rate.check()
                        if error is not None:
                            self.errors += 1
                            self.send(error)
                        if verdict is Verdict.CLOSE:
                            flooded = True
                            break
                        if verdict is Verdict.DROP:
                            continue
                    self.session.touch()  # input: the session is in use
                if msg.type == WSMsgType.BINARY:
                    self.on_audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self.on_text(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
                if sender.done():
                    break
        finally:
            es.remove_listener(self._on_event)
            self.session.remove_message_listener(self.send)
            ticker.cancel()
            if flooded:  # the error event out first (if the client reads), then 1008
                self.session.log.warning(
                    "bot websocket closed: message rate limit (%d dropped)", self.rate.dropped if self.rate else 0
                )
                self._queue.put_nowait(_RATE_CLOSE)
                await asyncio.wait({sender}, timeout=FLUSH_BEFORE_CLOSE_S)
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, ticker, *[t for t in (self._dropping,) if t], return_exceptions=True)
            last = _RATE_CLOSE if flooded else _CLOSE
            await self.ws.close(code=last.code, message=last.reason if flooded else b"")


async def bot_socket(request: web.Request) -> web.WebSocketResponse:
    session = session_for(request)  # 404 / 401 before the upgrade
    config = server_state(request).config
    max_audio = config.max_ws_message_bytes
    with SessionSockets(request, session, "bot", config.max_bot_sockets):  # 429 beyond
        ws = web.WebSocketResponse(max_msg_size=max(MAX_FRAME, 4 * max_audio), heartbeat=HEARTBEAT_S)
        await ws.prepare(request)
        rate = MessageLimit(request, "bot", config.max_ws_messages_per_s)
        connection = BotConnection(request, session, ws, max_audio, rate)
        session.log.info("bot websocket connected")
        async with Tracked(request.app, ws):
            await connection.run()
        session.log.info("bot websocket closed (%d error events)", connection.errors)
        return ws
