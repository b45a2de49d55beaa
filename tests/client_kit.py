"""The tests' one client kit: real HTTP, websocket (bot, frames) and aiortc clients against a `ServerThread` on
127.0.0.1, real media made in the test (tones, PCM16, WAV/MP3, images), and a log check."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
import wave
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from multidict import CIMultiDict
from PIL import Image

from server.media import marks
from server.websockets.frames import parse_frame

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


def _wav(pcm: bytes, rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def wav_of(samples: np.ndarray, rate: int = 16000) -> bytes:
    """Mono float samples in [-1, 1] as a 16-bit WAV file."""
    return _wav(pcm16(samples), rate)


def spoken_wav(path: Path, text: str, words_per_minute: int = 150) -> Path:
    """`text` said by espeak-ng into a WAV file at `path` (a skip, a failure in CI, without espeak-ng)."""
    import shutil

    import pytest

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng not found (apt-get install espeak-ng; the CI installs it)")
    cmd = [espeak, "-s", str(words_per_minute), "-w", str(path), text]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    assert path.stat().st_size > 44 * 100, "espeak-ng wrote no audio"
    return path


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A voiced tone as a WAV file."""
    return _wav(voiced_pcm16(seconds, rate), rate)


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


# -- live outputs: a real RTMP ingest on loopback, and what it recorded ---------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtmpIngest:
    """`tests/rtmp_ingest.py` in a process of its own: an RTMP server (FFmpeg's listen mode via PyAV) that records
    what one publisher sends to an FLV file. Killing it is the ingest dropping mid-stream."""

    def __init__(self, port: int, path: Path, key: str = "stream-key"):
        self.url = f"rtmp://127.0.0.1:{port}/live/{key}"
        self.path = path
        self.lines: list[str] = []
        script = Path(__file__).with_name("rtmp_ingest.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), self.url, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_line("listening", 30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"the ingest never printed {prefix!r} within {timeout} s (got {self.lines})")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def finish(self, timeout: float = 20) -> None:
        """Wait for the publisher to leave (the ingest exits), else kill it."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class ReceivedMedia:
    """What an ingest recorded, decoded: video frame times and their barcoded engine indexes (`--mark_frames`),
    the audio (mono float) with its start time, and the chirps found in it."""

    video_times: np.ndarray  # s, each decoded video frame's pts
    video_indexes: list[int]  # the engine frame index read from each frame's barcode
    audio: np.ndarray
    audio_rate: int
    audio_start: float  # s, pts of the first audio sample
    codecs: tuple[str, str]
    size: tuple[int, int]
    keyframe_times: list[float] = field(default_factory=list)  # s, the video's keyframes

    @property
    def video_s(self) -> float:
        """From the first frame's pts to the end of the last frame."""
        if len(self.video_times) < 2:
            return 0.0
        return float(self.video_times[-1] - self.video_times[0]) + 1.0 / self.fps

    @property
    def audio_s(self) -> float:
        return len(self.audio) / self.audio_rate

    @property
    def fps(self) -> float:
        """From the median frame interval (a gap does not change the rate; `missing` counts gaps)."""
        if len(self.video_times) < 2:
            return 0.0
        return 1.0 / float(np.median(np.diff(self.video_times)))

    def missing(self, skip_s: float = 0.0) -> int:
        """Frames missing between the first and the last, after the first `skip_s` of the stream: gaps in the
        barcoded indexes."""
        kept = [i for i, t in zip(self.video_indexes, self.video_times) if t >= self.video_times[0] + skip_s]
        return (kept[-1] - kept[0] + 1 - len(kept)) if kept else 0

    def av_offsets_ms(self) -> list[float]:
        """For each chirp (the audio mark at the start of frame k's audio, k a multiple of the mark period): its time
        in the audio minus the time of the video frame whose barcode reads k. Positive: audio late."""
        by_index = {index: t for index, t in zip(self.video_indexes, self.video_times)}
        offsets = []
        for start in marks.find_chirps(self.audio, self.audio_rate):
            t_audio = self.audio_start + start / self.audio_rate
            # the frame on screen at that moment, and the mark frame nearest to it (marks are 1 s apart)
            nearest = int(np.argmin(np.abs(self.video_times - t_audio)))
            period = FPS
            k = round(self.video_indexes[nearest] / period) * period
            if k in by_index:
                offsets.append(1000.0 * (t_audio - by_index[k]))
        return offsets


def read_received(path: Path) -> ReceivedMedia:
    import av

    times, indexes, chunks, keyframes = [], [], [], []
    audio_start = None
    rate = OUT_RATE
    with av.open(str(path)) as container:
        v, a = container.streams.video[0], container.streams.audio[0]
        codecs, size = (v.codec_context.name, a.codec_context.name), (v.codec_context.width, v.codec_context.height)
        for frame in container.decode(v, a):
            if isinstance(frame, av.VideoFrame):
                times.append(float(frame.pts * frame.time_base))
                if frame.key_frame:
                    keyframes.append(times[-1])
                indexes.append(marks.read_index(frame.to_ndarray(format="rgb24")))
            else:
                if audio_start is None:
                    audio_start = float(frame.pts * frame.time_base)
                rate = frame.sample_rate
                chunks.append(frame.to_ndarray().reshape(frame.layout.nb_channels, -1).mean(axis=0))
    order = np.argsort(times)
    return ReceivedMedia(
        np.asarray(times)[order],
        [indexes[i] for i in order],
        np.concatenate(chunks) if chunks else np.zeros(0),
        rate,
        audio_start or 0.0,
        codecs,
        size,
        sorted(keyframes),
    )


def loud_seconds(audio: np.ndarray, rate: int, block_s: float = 0.02, threshold: float = 0.02) -> float:
    """Seconds of 20 ms blocks whose RMS is above `threshold`: how much sound (speech, a tone) got through."""
    n = int(block_s * rate)
    blocks = audio[: len(audio) // n * n].reshape(-1, n)
    return float((np.sqrt((blocks**2).mean(axis=1)) > threshold).sum() * block_s)


class WhipReceiver:
    """A WHIP endpoint (RFC 9725) on 127.0.0.1 made with aiohttp and aiortc, as a media server's ingest would be:
    `POST /whip` (application/sdp offer -> 201, answer, Location), `DELETE /whip/<resource>`. It records what the
    publisher's tracks deliver: video frame times and audio samples (mono float)."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.posts = 0
        self.deletes = 0
        self.video_times: list[float] = []  # pts seconds of each frame received
        self.audio_chunks: list[np.ndarray] = []
        self.audio_rate = OUT_RATE
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> WhipReceiver:
        app = web.Application()
        app.router.add_post("/whip", self._offer)
        app.router.add_delete("/whip/{resource}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/whip"
        return self

    async def _offer(self, request):
        self.posts += 1
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        assert request.content_type == "application/sdp"
        pc = loopback_pc()
        resource = f"r{self.posts}"
        self.pcs[resource] = pc

        @pc.on("track")
        def on_track(track):
            self._tasks.append(asyncio.ensure_future(self._record(track)))

        await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/whip/{resource}"},
        )

    async def _delete(self, request):
        self.deletes += 1
        pc = self.pcs.pop(request.match_info["resource"], None)
        if pc is None:
            return web.Response(status=404)
        await pc.close()
        return web.Response(status=200)

    async def _record(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.video_times.append(float(frame.pts * frame.time_base))
            else:
                self.audio_rate = frame.sample_rate
                pcm = frame.to_ndarray().reshape(-1, frame.layout.nb_channels if frame.format.is_packed else 1)
                self.audio_chunks.append(pcm.mean(axis=1) / 32768.0)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.audio_chunks) if self.audio_chunks else np.zeros(0)

    async def close(self) -> None:
        for pc in list(self.pcs.values()):
            await pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()


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
