"""A client of one vexpress-rt session over the public API (docs/websocket.md): `POST /v1/sessions`, the bot
websocket (PCM16 in, control and playback events out), the frames websocket (JPEG + PCM16 per frame), `DELETE`.

Framework-free (aiohttp only), so that adapters for bot frameworks (`vexpress_rt_client/pipecat.py`) hold only the
mapping between the framework's frames and these calls. Every wait is bounded: a server that stops answering or
goes away ends `events()` / `frames()` with `SessionLost` instead of a hang.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import aiohttp

from . import wire
from .frames import FrameMessage, parse_frame


class SessionLost(ConnectionError):
    """The server closed the session's sockets, stopped sending frames, or could not be reached."""


@dataclass
class SessionOptions:
    """What `POST /v1/sessions` accepts (None: the server's default). `sample_rate`/`channels` are the PCM16 format
    pushed on the bot websocket; `jpeg_quality` is asked of the frames websocket."""

    avatar_id: str | None = None
    fps: int | None = None
    preset: str | None = None  # a schedule: "default" or "low_latency" (/v1/info "presets"; docs/streaming.md)
    steps: int | None = None
    guidance_scale: float | None = None
    reference_attention_weight: float | None = None
    audio_attention_weight: float | None = None
    style: str | None = None  # docs/controls.md: an expression style, then the fields here over it
    motion: str | None = None
    motion_amplitude: float | None = None
    blinks_per_minute: float | None = None
    retarget_strategy: str | None = None  # fix_face (live default), no_retarget, offset_retarget, naive_retarget
    strategy: str | None = None  # the window schedule: staggered or chunked (docs/streaming.md)
    new_frames: int | None = None
    context_frames: int | None = None
    seed: int | None = None
    decoder: str | None = None
    framing: str | None = None  # crop (default), portrait or WxH, e.g. "1280x720" (docs/framing.md)
    background: str | None = None  # photo (default), "#rrggbb", a data: image URL, or transparent
    outputs: list[dict] | None = None  # pushed from the start: [{"url": "rtmp://..."}] (docs/websocket.md)
    sample_rate: int = 16000
    channels: int = 1
    record: bool | None = None
    jpeg_quality: int | None = None

    def body(self) -> dict:
        fields = asdict(self)
        body = {
            k: v for k, v in fields.items() if v is not None and k not in ("sample_rate", "channels", "jpeg_quality")
        }
        body["audio"] = {"sample_rate": self.sample_rate, "channels": self.channels}
        return body


class AvatarSession:
    """One session: `await open()`, then `send_audio` / `end_utterance` / `interrupt` / `mark`, iterate `events()`
    and `frames()` (each from one task), and `await close()` (DELETE; idempotent, bounded)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        options: SessionOptions | None = None,
        *,
        connect_timeout_s: float = 15.0,
        frame_timeout_s: float = 5.0,
    ):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.options = options or SessionOptions()
        self.connect_timeout_s = connect_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.info: dict = {}  # the creation reply (id, token, URLs)
        self.ready: dict = {}  # `session.ready`: fps, sample_rate, channels, width, height, output_sample_rate
        self.stream: dict = {}  # the frames websocket's `stream.start`
        self._http: aiohttp.ClientSession | None = None
        self._bot: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._frames: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._closed = False

    @property
    def fps(self) -> int:
        return int(self.ready["fps"])

    @property
    def sample_rate(self) -> int:
        return int(self.ready["sample_rate"])

    @property
    def channels(self) -> int:
        return int(self.ready["channels"])

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the session and connect both websockets; `SessionLost` (with the server's reason) on failure."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.connect_timeout_s))
        try:
            async with self._http.post(f"{self.url}/v1/sessions", json=self.options.body(), headers=headers) as r:
                if r.status != 201:
                    raise SessionLost(f"POST /v1/sessions: {r.status} {(await r.text())[:500]}")
                self.info = await r.json()
            auth = {"Authorization": f"Bearer {self.info['token']}"}
            self._bot = bot = await self._http.ws_connect(self.info["ws_url"], headers=auth, heartbeat=10.0)
            self.ready = await self._first_json(bot, wire.SESSION_READY)
            params = {"quality": str(self.options.jpeg_quality)} if self.options.jpeg_quality else {}
            self._frames = frames = await self._http.ws_connect(self.info["frames_url"], headers=auth, params=params)
            self.stream = await self._first_json(frames, wire.STREAM_START)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KeyError, ValueError) as exc:
            await self.close()
            raise SessionLost(f"could not open a session on {self.url}: {exc!r}") from exc
        except BaseException:
            await self.close()
            raise

    async def _first_json(self, ws: aiohttp.ClientWebSocketResponse[bool], kind: str) -> dict:
        msg = await ws.receive(timeout=self.connect_timeout_s)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise SessionLost(f"expected {kind}, got {msg.type.name}")
        message = json.loads(msg.data)
        if message.get("type") != kind:
            raise SessionLost(f"expected {kind}, got {message}")
        return message

    async def close(self) -> None:
        """End the session (DELETE, bounded by the connect timeout; a server already gone is fine)."""
        if self._closed:
            return
        self._closed = True
        http = self._http
        if http is None:
            return
        try:
            if self.info:
                headers = {"Authorization": f"Bearer {self.info['token']}"}
                async with http.delete(f"{self.url}/v1/sessions/{self.info['id']}", headers=headers) as r:
                    await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        for ws in (self._bot, self._frames):
            if ws is not None:
                try:
                    await asyncio.wait_for(ws.close(), 2.0)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
        await http.close()

    # -- bot websocket: out ---------------------------------------------------------------------------------------
    async def send_audio(self, pcm16: bytes) -> None:
        """PCM16 LE at the session's `sample_rate` and `channels`."""
        await self._send(lambda ws: ws.send_bytes(pcm16))

    async def end_utterance(self) -> None:
        await self._send_json(wire.message(wire.AUDIO_END))

    async def interrupt(self) -> None:
        await self._send_json(wire.message(wire.INTERRUPT))

    async def mark(self, name: str) -> None:
        await self._send_json(wire.message(wire.MARK, name=name))

    async def control(self, **fields: object) -> None:
        """Change live controls (strength, style, motion, blink rate; docs/controls.md): `control.accepted` and then
        `control.applied` (the frame it took effect on) come through `events()`."""
        await self._send_json(wire.message(wire.CONTROL, **fields))

    async def _send_json(self, message: dict) -> None:
        await self._send(lambda ws: ws.send_str(json.dumps(message)))

    async def _send(self, write) -> None:
        if self._bot is None or self._bot.closed:
            raise SessionLost("the session's websocket is closed")
        try:
            await asyncio.wait_for(write(self._bot), self.frame_timeout_s)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError) as exc:
            raise SessionLost(f"sending to the session failed: {exc!r}") from exc

    # -- in ---------------------------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[dict]:
        """The bot websocket's events until the session ends; `SessionLost` when it closes unasked."""
        assert self._bot is not None, "open() first"
        async for msg in self._bot:
            if msg.type == aiohttp.WSMsgType.TEXT:
                yield json.loads(msg.data)
        if not self._closed:
            raise SessionLost(f"the server closed the session's websocket ({self._bot.close_code})")

    async def frames(self) -> AsyncIterator[FrameMessage]:
        """Every frame (header fields, JPEG, its PCM16 at 48 kHz), as the session plays them. `SessionLost` when
        the socket closes unasked or no frame comes for `frame_timeout_s` (the server sends one every 1/fps)."""
        assert self._frames is not None, "open() first"
        while True:
            try:
                msg = await self._frames.receive(timeout=self.frame_timeout_s)
            except asyncio.TimeoutError as exc:
                raise SessionLost(f"no frame from the server for {self.frame_timeout_s:g} s") from exc
            if msg.type == aiohttp.WSMsgType.BINARY:
                yield parse_frame(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                if self._closed:
                    return
                raise SessionLost(f"the server closed the frames websocket ({self._frames.close_code})")
            elif msg.type == aiohttp.WSMsgType.ERROR:
                raise SessionLost(f"frames websocket error: {self._frames.exception()!r}")
