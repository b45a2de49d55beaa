"""The tests' one client kit: real HTTP, websocket (bot, frames) and aiortc clients against a `ServerThread` on
127.0.0.1, real media made in the test (tones, PCM16, WAV/MP3, images), and a log check."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
import wave
import zlib
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from multidict import CIMultiDict
from PIL import Image

from server.frames_ws import parse_frame

UNHANDLED = ("Traceback", "Error handling request", "Unhandled exception", "unhandled error", "Task exception")


def unhandled_records(records: list[logging.LogRecord]) -> list[str]:
    """Log records that show an exception nobody handled (or a handler logged with its traceback)."""
    bad = []
    for r in records:
        text = r.getMessage()
        if r.exc_info or any(marker in text for marker in UNHANDLED):
            bad.append(f"{r.name} {r.levelname}: {text[:300]}")
    return bad


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def http(timeout: float = 30) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))


async def create_session(client: aiohttp.ClientSession, url: str, body: dict | None = None, **kw) -> dict:
    async with client.post(f"{url}/v1/sessions", json=body or {}, **kw) as r:
        assert r.status == 201, (r.status, await r.text())
        return await r.json()


async def delete_session(client: aiohttp.ClientSession, session: dict, base_url: str | None = None) -> int:
    """DELETE the session (`session["url"]`, or under `base_url` by its id); 204, or 404 when it ended already."""
    url = f"{base_url}/v1/sessions/{session['id']}" if base_url else session["url"]
    async with client.delete(url, headers=bearer(session["token"])) as r:
        assert r.status in (204, 404), (r.status, await r.text())
        return r.status


def ws_url(session: dict, path: str = "ws") -> str:
    return session["ws_url"].rsplit("/", 1)[0] + f"/{path}?token={session['token']}"


async def ws_messages(ws, seconds: float, until=None) -> list:
    """Messages received within `seconds` (JSON decoded; binary as bytes); stops at close, or after the message
    for which `until(message)` is true."""
    out = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        if msg.type == aiohttp.WSMsgType.TEXT:
            out.append(json.loads(msg.data))
        elif msg.type == aiohttp.WSMsgType.BINARY:
            out.append(msg.data)
        else:
            out.append(msg.type)
            break
        if until is not None and until(out[-1]):
            break
    return out


def pcm16(samples: np.ndarray) -> bytes:
    """float (n,) or (n, channels) in [-1, 1] -> PCM16 LE interleaved bytes."""
    return np.clip(np.round(np.asarray(samples) * 32767), -32768, 32767).astype("<i2").tobytes()


def voiced_pcm16(seconds: float, rate: int = 16000, freq: float = 220.0, channels: int = 1) -> bytes:
    """A voiced tone with a syllable-rate envelope: enough for the engine to make speech frames of."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return np.repeat((x * 32767).astype("<i2")[:, None], channels, axis=1).tobytes()


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(voiced_pcm16(seconds, rate))
    return out.getvalue()


def mp3_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mp3") as container:
        stream = container.add_stream("mp3", rate=rate)
        stream.layout = "mono"
        samples = np.frombuffer(voiced_pcm16(seconds, rate), dtype="<i2")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def image_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with one tiny compressed row: a decompression bomb's
    shape (the header is all a server may trust before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def avatar_form(image: bytes, kps: str | bytes | None = None, name: str | None = None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", image, filename="portrait.bin", content_type="application/octet-stream")
    if isinstance(kps, bytes):
        form.add_field("kps", kps, filename="kps.bin")
    elif kps is not None:
        form.add_field("kps", kps)
    if name is not None:
        form.add_field("name", name)
    return form


def loopback_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def viewer_offer() -> tuple[RTCPeerConnection, str]:
    """A receive-only peer (video + audio) and its offer SDP (host candidates on 127.0.0.1 when restricted)."""
    pc = loopback_pc()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


class FrameCounter:
    """Counts the frames a peer receives on its tracks."""

    def __init__(self, pc: RTCPeerConnection):
        self.video = 0
        self.audio = 0
        self.tasks: list[asyncio.Task] = []
        pc.on("track", lambda track: self.tasks.append(asyncio.ensure_future(self._consume(track))))

    async def _consume(self, track) -> None:
        try:
            while True:
                await track.recv()
                if track.kind == "video":
                    self.video += 1
                else:
                    self.audio += 1
        except MediaStreamError:
            pass

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def connect_viewer(client: aiohttp.ClientSession, session: dict) -> tuple[RTCPeerConnection, FrameCounter, str]:
    """A WHEP viewer of the session: (its peer connection, its frame counter, its resource URL)."""
    pc, sdp = await viewer_offer()
    counter = FrameCounter(pc)
    headers = {**bearer(session["token"]), "Content-Type": "application/sdp"}
    async with client.post(session["whep_url"], data=sdp, headers=headers) as r:
        assert r.status == 201, (r.status, await r.text())
        answer = await r.text()
        location = r.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc, counter, location


async def wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


def vanish(pc: RTCPeerConnection) -> None:
    """The peer disappears without a word: its UDP sockets close, no DTLS close, no RTCP BYE, no ICE (as when a
    laptop lid closes or the network drops). The far end notices only through ICE consent checks failing."""
    for transceiver in pc.getTransceivers():
        ice = transceiver.receiver.transport.transport  # DTLS -> ICE transport
        for protocol in list(ice._connection._protocols):
            if protocol.transport is not None:
                protocol.transport.close()


class Bystander:
    """A well-behaved client in a thread of its own: a session with a frames websocket, counting what arrives, while
    a test does something hostile to the server. `stop()` returns the arrival times."""

    def __init__(self, url: str, headers: dict | None = None):
        import threading

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


def frame_gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


def longest_gap(arrivals: list[float]) -> float:
    return max(frame_gaps(arrivals), default=float("inf"))


# -- bot and frames websocket clients ----------------------------------------------------------------------------
FPS = 25
OUT_RATE = 48000
SPF = OUT_RATE // FPS


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


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


# -- a WHEP client that trickles (RFC 9725 / RFC 8840) ---------------------------------------------------------
TRICKLE_TYPE = "application/trickle-ice-sdpfrag"


def split_candidates(sdp: str) -> tuple[str, list[tuple[str, str]]]:
    """An SDP without its `a=candidate` and `a=end-of-candidates` lines, and the candidates it had as
    (mid, `a=candidate:...` line): what a trickling client posts, then sends later."""
    kept, held, mid = [], [], "0"
    for line in sdp.splitlines():
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        if line.startswith("a=candidate:"):
            held.append((mid, line))
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", held


def ice_credentials(sdp: str) -> tuple[str, str]:
    ufrag = next(ln.split(":", 1)[1] for ln in sdp.splitlines() if ln.startswith("a=ice-ufrag:"))
    pwd = next(ln.split(":", 1)[1] for ln in sdp.splitlines() if ln.startswith("a=ice-pwd:"))
    return ufrag, pwd


def sdpfrag(ufrag: str, pwd: str, candidates: list[tuple[str, str]], end: bool = True) -> str:
    """An RFC 8840 fragment: the ICE credentials, then per mid its m-line, candidates and end-of-candidates."""
    lines = [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}"]
    mids = sorted({mid for mid, _ in candidates}) or ["0"]
    for mid in mids:
        lines += ["m=audio 9 UDP/TLS/RTP/SAVPF 0", f"a=mid:{mid}"]
        lines += [line for m, line in candidates if m == mid]
        if end:
            lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"


@dataclass
class TrickleViewer:
    """A WHEP viewer that posted its offer without candidates; `patch()` sends them (or anything) to its resource."""

    client: aiohttp.ClientSession
    session: dict
    pc: RTCPeerConnection
    counter: FrameCounter
    resource_url: str
    etag: str | None
    headers: CIMultiDict  # of the 201
    answer: str
    held: list[tuple[str, str]]  # the candidates not sent yet
    ufrag: str
    pwd: str

    async def patch(self, body: str, if_match: str | None = "etag", content_type: str = TRICKLE_TYPE) -> int:
        headers = {**bearer(self.session["token"]), "Content-Type": content_type}
        if if_match is not None:
            headers["If-Match"] = self.etag if if_match == "etag" else if_match
        async with self.client.patch(self.resource_url, data=body, headers=headers) as r:
            await r.read()
            return r.status

    async def trickle(self) -> int:
        """Every held candidate and the end of candidates, in one PATCH (204 expected)."""
        status = await self.patch(sdpfrag(self.ufrag, self.pwd, self.held))
        self.held = []
        return status

    async def delete(self) -> int:
        async with self.client.delete(self.resource_url, headers=bearer(self.session["token"])) as r:
            await r.read()
            return r.status


async def trickle_viewer(client: aiohttp.ClientSession, session: dict, base_url: str) -> TrickleViewer:
    """POST a candidate-less offer; the answer is applied later (`apply_answer`) so that the server can only reach
    this peer through the candidates trickled to it."""
    pc, sdp = await viewer_offer()
    counter = FrameCounter(pc)
    offer, held = split_candidates(sdp)
    ufrag, pwd = ice_credentials(sdp)
    headers = {**bearer(session["token"]), "Content-Type": "application/sdp"}
    async with client.post(session["whep_url"], data=offer, headers=headers) as r:
        assert r.status == 201, (r.status, await r.text())
        answer = await r.text()
        out = CIMultiDict(r.headers)
    return TrickleViewer(
        client, session, pc, counter, base_url + out["Location"], out.get("ETag"), out, answer, held, ufrag, pwd
    )


async def apply_answer(viewer: TrickleViewer) -> None:
    await viewer.pc.setRemoteDescription(RTCSessionDescription(sdp=viewer.answer, type="answer"))
