"""Websocket clients of a session: the bot socket (`Bot`), the frames socket (`Frames`), and a well-behaved
bystander in a thread of its own."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from kit.http_calls import bearer, create_session, http, ws_url
from kit.media_synth import pcm16
from server.websockets.frames import parse_frame


class Bystander:
    """A well-behaved client in a thread of its own: a session with a frames websocket, counting what arrives, while
    a test does something hostile to the server. `stop()` returns the arrival times."""

    def __init__(self, url: str, headers: dict | None = None):

        self.url, self.headers = url, headers or {}
        self.arrivals: list[float] = []
        self.error: BaseException | None = None
        self._stop = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="bystander", daemon=True)

    def start(self) -> Bystander:
        self._thread.start()
        assert self._ready.wait(30), "the bystander did not connect"
        if self.error:
            raise self.error
        return self

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop = loop
        try:
            async with http(timeout=3600) as c:
                self.session = await create_session(c, self.url, headers=self.headers)
                ws = await c.ws_connect(ws_url(self.session, "frames"))
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        self.arrivals.append(loop.time())
                    elif msg.type != aiohttp.WSMsgType.TEXT:
                        raise AssertionError(f"the bystander's frames websocket ended: {msg.type.name}")
                await ws.close()
                async with c.delete(self.session["url"], headers=bearer(self.session["token"])):
                    pass
        except BaseException as exc:  # reported by start()/stop()
            self.error = exc
            self._ready.set()

    def stop(self) -> list[float]:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self.error:
            raise self.error
        return self.arrivals


@dataclass
class Received:
    at: float
    message: dict


class Bot:
    """The session websocket: every server message is kept with its arrival time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.messages: list[Received] = []
        self._new = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())
        self.closed_code: int | None = None

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, session: dict, **kw) -> Bot:
        ws = await http.ws_connect(session["ws_url"], headers={"Authorization": f"Bearer {session['token']}"}, **kw)
        return cls(ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append(Received(time.monotonic(), json.loads(msg.data)))
                self._new.set()
        self.closed_code = self.ws.close_code
        self._new.set()

    def of(self, kind: str) -> list[dict]:
        return [r.message for r in self.messages if r.message["type"] == kind]

    async def wait_for(self, predicate, timeout: float = 30.0, after: int = 0) -> dict:
        """The first message (from index `after`) for which `predicate(message)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.messages[after:]:
                if predicate(r.message):
                    return r.message
            if self._task.done():
                raise AssertionError(f"the websocket closed ({self.closed_code}) before the awaited message")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                types = [r.message["type"] for r in self.messages]
                raise AssertionError(f"no awaited message within {timeout} s; got {types}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_type(self, kind: str, timeout: float = 30.0, after: int = 0, **fields) -> dict:
        return await self.wait_for(
            lambda m: m["type"] == kind and all(m.get(k) == v for k, v in fields.items()), timeout, after
        )

    async def send(self, message: dict) -> None:
        await self.ws.send_str(json.dumps(message))

    async def push(self, samples: np.ndarray, chunk: int = 320, pace_s: float = 0.0) -> None:
        """PCM16 in `chunk`-sample messages, `pace_s` apart (0: as fast as the socket takes them)."""
        data = pcm16(samples)
        step = 2 * chunk * (samples.shape[1] if samples.ndim == 2 else 1)
        t0 = time.monotonic()
        for k, start in enumerate(range(0, len(data), step)):
            if pace_s:
                await asyncio.sleep(max(0.0, t0 + k * pace_s - time.monotonic()))
            await self.ws.send_bytes(data[start : start + step])

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class FrameInfo:
    at: float
    index: int
    pts_us: int
    speaking: bool
    utterance: int
    audio: np.ndarray
    jpeg: bytes


@dataclass
class Frames:
    """The frames websocket: every frame's header fields and audio (JPEGs kept when asked)."""

    ws: aiohttp.ClientWebSocketResponse
    keep_jpeg: bool = False
    start: dict | None = None
    frames: list[FrameInfo] = field(default_factory=list)
    task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, session: dict, keep_jpeg: bool = False, **params) -> Frames:
        ws = await http.ws_connect(session["frames_url"], params={"token": session["token"], **params})
        frames = cls(ws, keep_jpeg)
        frames.task = asyncio.ensure_future(frames._read())
        return frames

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.start = json.loads(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                f = parse_frame(msg.data)
                jpeg = f.jpeg if self.keep_jpeg else b""
                self.frames.append(
                    FrameInfo(time.monotonic(), f.index, f.pts_us, f.speaking, f.utterance, f.audio.copy(), jpeg)
                )

    def speech(self, utterance: int | None = None) -> list[FrameInfo]:
        return [f for f in self.frames if f.speaking and (utterance is None or f.utterance == utterance)]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self.task, return_exceptions=True)


def played_audio(frames: list[FrameInfo], utterance: int) -> np.ndarray:
    """The audio of an utterance's frames in order, without the engine's hold frames (silent frames it plays while
    generation catches up: the rest shifts later, nothing is lost)."""
    pieces = [f.audio for f in frames if f.speaking and f.utterance == utterance and f.audio.any()]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
