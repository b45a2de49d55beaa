"""Real clients of the bot websocket and the frames websocket (aiohttp), for the tests."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from server.frames_ws import parse_frame

FPS = 25
OUT_RATE = 48000
SPF = OUT_RATE // FPS


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))


def pcm16(samples: np.ndarray) -> bytes:
    """float (n,) or (n, channels) in [-1, 1] -> PCM16 LE interleaved bytes."""
    return np.clip(np.round(np.asarray(samples) * 32767), -32768, 32767).astype("<i2").tobytes()


def tone(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A test signal with no silent stretch: a 220 Hz tone with a little noise (float32, mono)."""
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.02, len(t))
    return (0.3 * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32)


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
                self.frames.append(FrameInfo(time.monotonic(), f.index, f.pts_us, f.speaking, f.utterance,
                                             f.audio.copy(), jpeg))

    def speech(self, utterance: int | None = None) -> list[FrameInfo]:
        return [f for f in self.frames if f.speaking and (utterance is None or f.utterance == utterance)]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self.task, return_exceptions=True)


async def create_session(http: aiohttp.ClientSession, url: str, body: dict | None = None) -> dict:
    async with http.post(f"{url}/v1/sessions", json=body or {}) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def delete_session(http: aiohttp.ClientSession, session: dict) -> None:
    async with http.delete(session["url"], headers={"Authorization": f"Bearer {session['token']}"}) as resp:
        assert resp.status in (204, 404), await resp.text()


def played_audio(frames: list[FrameInfo], utterance: int) -> np.ndarray:
    """The audio of an utterance's frames in order, without the engine's hold frames (silent frames it plays while
    generation catches up: the rest shifts later, nothing is lost)."""
    pieces = [f.audio for f in frames if f.speaking and f.utterance == utterance and f.audio.any()]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
