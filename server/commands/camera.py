"""`vexpress-rt camera`: a session's avatar as a camera (and its voice as a microphone) for Zoom, Teams, Meet...

    vexpress-rt camera --server http://gpu-box:8080 --session <id> --token <token>
    vexpress-rt camera --server http://gpu-box:8080 --api-key KEY        # opens a new session and prints it

A client of a running server, on the presenter's own machine (where the call app runs; the GPU server usually is
elsewhere). It reads the session's frames websocket (`/v1/sessions/{id}/frames`: every frame as JPEG with exactly
its 1/fps of audio): plain HTTP(S) on the server's one port, no UDP or TURN to set up, and the audio comes paired
with its frame, so the camera and the microphone cannot drift apart.

Pacing (`FramePacer`): frames are handed to the camera on a steady clock at the session fps, from the first frame
on (t0 + k/fps). A consumer that is slow (a `send` that blocks past the next tick) makes the pacer skip the ticks it
missed, dropping their frames (and their audio) and counting them: the output stays on the clock, so it never
drifts late. Frames that arrive faster than the clock wait in a small queue that drops its oldest beyond
`--queue` frames (counted); a tick with no new frame repeats the last picture with silence (counted).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import aiohttp
import numpy as np
from PIL import Image

from vexpress_rt_client.frames import parse_frame

from .virtual_devices import AudioSink, DeviceError, PulseAudioSink, VideoSink, VirtualCamera, check_devices

DEFAULT_QUEUE_FRAMES = 4  # 160 ms at 25 fps: jitter of the network absorbed, latency bounded
JITTER = 0.25  # of a period: a send this late is still on time (the OS woke us late); beyond, ticks are skipped


@dataclass
class CameraFrame:
    index: int  # the session's frame index
    image: np.ndarray  # (height, width, 3) uint8 RGB
    audio: np.ndarray  # int16 mono: this frame's 1/fps of audio
    sample_rate: int


@dataclass
class PacerStats:
    sent: int = 0  # frames handed to the camera
    dropped_late: int = 0  # ticks skipped because the camera took too long (their frames dropped)
    dropped_queue: int = 0  # frames dropped because more arrived than the clock could show
    repeated: int = 0  # ticks with no new frame: the last picture again, with silence
    audio_dropped: int = 0  # frames whose audio the microphone could not take in time


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class FramePacer:
    """Frames in (`put`, from any thread), frames out to the camera and microphone on the clock (`run`, a thread)."""

    def __init__(
        self,
        fps: float,
        video: VideoSink,
        audio: AudioSink | None = None,
        clock: Clock | None = None,
        queue_frames: int = DEFAULT_QUEUE_FRAMES,
    ):
        self.period = 1.0 / fps
        self.video, self.audio = video, audio
        self.clock = clock or MonotonicClock()
        self.stats = PacerStats()
        self._queue: collections.deque[CameraFrame] = collections.deque()
        self._queue_frames = queue_frames
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)

    def put(self, frame: CameraFrame) -> None:
        with self._lock:
            if len(self._queue) >= self._queue_frames:
                self._queue.popleft()
                self.stats.dropped_queue += 1
            self._queue.append(frame)
            self._arrived.notify()

    def _take(self, skip: int = 0) -> CameraFrame | None:
        """The next frame after dropping `skip` (the frames of skipped ticks), or None when none is queued."""
        with self._lock:
            for _ in range(min(skip, len(self._queue))):
                self._queue.popleft()
            return self._queue.popleft() if self._queue else None

    def wait_first(self, stop: threading.Event, timeout: float) -> bool:
        """Wait for the first frame (the clock starts there)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._queue and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(min(left, 0.1))
            return bool(self._queue)

    def run(self, stop: threading.Event, max_ticks: int | None = None) -> PacerStats:
        """Tick k at t0 + k * period until `stop` is set (or `max_ticks` ticks). t0 is when `run` starts."""
        t0 = self.clock.now()
        k, skip = 0, 0
        last: CameraFrame | None = None
        while not stop.is_set() and (max_ticks is None or k < max_ticks):
            self.clock.sleep_until(t0 + k * self.period)
            frame = self._take(skip)
            if frame is None:
                if last is None:  # nothing to show yet: the tick passes
                    k += 1
                    continue
                frame = CameraFrame(last.index, last.image, np.zeros_like(last.audio), last.sample_rate)
                self.stats.repeated += 1
            self.video.send(frame.image)
            if self.audio is not None and not self.audio.write(frame.audio):
                self.stats.audio_dropped += 1
            self.stats.sent += 1
            last = frame
            # A send that ran past the next tick (beyond scheduling jitter): skip to the first tick still ahead,
            # dropping the frames of the ticks missed, so that nothing is shown off the clock.
            behind = self.clock.now() - (t0 + (k + 1) * self.period)
            skip = math.ceil(behind / self.period - 1e-9) if behind > JITTER * self.period else 0
            self.stats.dropped_late += skip
            k += 1 + skip
        return self.stats


def decode(data: bytes) -> CameraFrame:
    """A frames-websocket message -> a CameraFrame (RGB image, its PCM16 audio)."""
    msg = parse_frame(data)
    image = np.asarray(Image.open(io.BytesIO(msg.jpeg)).convert("RGB"))
    return CameraFrame(msg.index, image, msg.audio.copy(), msg.sample_rate)


@dataclass
class StreamInfo:
    fps: float
    width: int
    height: int
    sample_rate: int


async def read_frames(
    ws: aiohttp.ClientWebSocketResponse[bool], on_start, on_frame, stop: threading.Event, max_frames: int | None = None
) -> int:
    """Read the frames websocket: `on_start(StreamInfo)` once, then `on_frame(CameraFrame)` for each frame."""
    count = 0
    async for msg in ws:
        if stop.is_set():
            break
        if msg.type == aiohttp.WSMsgType.TEXT:
            start = json.loads(msg.data)
            if start.get("type") == "stream.start":
                on_start(StreamInfo(start["fps"], start["width"], start["height"], start["sample_rate"]))
        elif msg.type == aiohttp.WSMsgType.BINARY:
            on_frame(decode(msg.data))
            count += 1
            if max_frames is not None and count >= max_frames:
                break
    return count


async def run_camera(
    frames_url: str,
    token: str,
    open_video,
    open_audio=None,
    queue_frames: int = DEFAULT_QUEUE_FRAMES,
    stop: threading.Event | None = None,
    max_frames: int | None = None,
) -> PacerStats:
    """Frames of a session into the devices `open_video(StreamInfo) -> VideoSink` and `open_audio(StreamInfo) ->
    AudioSink` (None: video only), paced on a thread of their own, until the session ends or `stop` is set."""
    stop = stop or threading.Event()
    pacer: FramePacer | None = None
    thread: threading.Thread | None = None
    sinks: list = []
    failures: list[BaseException] = []

    def on_start(info: StreamInfo) -> None:
        nonlocal pacer, thread
        video = open_video(info)
        sinks.append(video)
        audio = open_audio(info) if open_audio is not None else None
        if audio is not None:
            sinks.append(audio)
        pacer = FramePacer(info.fps, video, audio, queue_frames=queue_frames)

        def pace() -> None:
            try:
                if pacer is not None and pacer.wait_first(stop, timeout=30):
                    pacer.run(stop)
            except BaseException as exc:  # a device that fails mid-stream: reported by run_camera
                failures.append(exc)
                stop.set()

        thread = threading.Thread(target=pace, name="camera-pacer", daemon=True)
        thread.start()

    def on_frame(frame: CameraFrame) -> None:
        if pacer is not None:
            pacer.put(frame)

    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(frames_url, headers={"Authorization": f"Bearer {token}"}) as ws:
                await read_frames(ws, on_start, on_frame, stop, max_frames)
    finally:
        stop.set()
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 5)
        for sink in sinks:
            sink.close()
    if failures:
        raise failures[0]
    return pacer.stats if pacer is not None else PacerStats()


# -- the command ------------------------------------------------------------------------------------------------
def add_camera_command(sub) -> None:
    p = sub.add_parser(
        "camera",
        help="show a session's avatar as a virtual camera (and its voice as a virtual microphone) for video calls",
        description="Read a session's frames from a running server and write them to a virtual camera "
        "(pyvirtualcam: v4l2loopback on Linux, OBS Virtual Camera on Windows/macOS) and its audio to a "
        "PulseAudio/PipeWire sink, on a steady clock at the session's fps (frames are dropped, never delayed, when "
        "the camera is slow). Without --session, opens a new session and prints its id, token and URLs.",
    )
    p.add_argument("--server", default="http://127.0.0.1:8080", help="the server's base URL; default %(default)s")
    p.add_argument("--session", help="the session id (default: open a new session)")
    p.add_argument("--token", help="the session's token (or give --api-key)")
    p.add_argument("--api-key", help="the server's API key: opens a session, or stands in for the token")
    p.add_argument("--avatar", help="a new session's avatar id (default: the server's default portrait)")
    p.add_argument("--device", help="the camera device, e.g. /dev/video10 (default: the first virtual camera)")
    p.add_argument("--backend", help="pyvirtualcam backend: v4l2loopback, obs, unitycapture (default: the platform's)")
    p.add_argument("--mic", default="vexpress", help="PulseAudio/PipeWire sink for the voice; default %(default)s")
    p.add_argument("--no-mic", action="store_true", help="video only")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE_FRAMES, help="frames waiting at most; default 4")
    p.set_defaults(func=cmd_camera)


async def _open_session(server: str, api_key: str | None, avatar: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"avatar_id": avatar} if avatar else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server}/v1/sessions", json=body, headers=headers) as r:
            data = await r.json()
            if r.status != 201:
                raise DeviceError(f"POST /v1/sessions: {r.status} {data}")
            return data


async def _close_session(server: str, session_id: str, token: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.delete(f"{server}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"}):
            pass


def _frames_url(server: str, session_id: str) -> str:
    return server.replace("http", "ws", 1).rstrip("/") + f"/v1/sessions/{session_id}/frames"


def cmd_camera(args: argparse.Namespace) -> int:
    server = args.server.rstrip("/")

    def open_video(info: StreamInfo) -> VideoSink:
        camera = VirtualCamera(info.width, info.height, info.fps, device=args.device, backend=args.backend)
        print(f"camera: {camera.device}, {info.width}x{info.height} at {info.fps:g} fps", file=sys.stderr, flush=True)
        return camera

    def open_audio(info: StreamInfo) -> AudioSink:
        return PulseAudioSink(args.mic, info.sample_rate)

    stop = threading.Event()

    async def main() -> PacerStats:
        try:  # Ctrl+C stops the stream and prints the counts (no signal handlers on Windows: there it just exits)
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
        session_id, token = args.session, args.token or args.api_key
        if session_id is not None and not token:
            raise DeviceError("give --token (the session's) or --api-key")
        check_devices(args.device, args.backend, mic=not args.no_mic)  # before a session is opened for them
        if session_id is None:
            session = await _open_session(server, args.api_key, args.avatar)
            session_id, token = session["id"], session["token"]
            keys = ("id", "token", "ws_url", "speak_url", "whep_url", "view_url", "url")
            print(json.dumps({k: session.get(k) for k in keys}), flush=True)
        if not token:
            raise DeviceError("give --token (the session's) or --api-key")
        try:
            return await run_camera(
                _frames_url(server, session_id),
                token,
                open_video,
                None if args.no_mic else open_audio,
                args.queue,
                stop,
            )
        finally:
            if args.session is None:  # the session this command opened ends with it
                await _close_session(server, session_id, token)

    try:
        stats = asyncio.run(main())
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (aiohttp.ClientError, OSError) as exc:
        print(f"error: cannot reach {server}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    print(json.dumps({"camera": asdict(stats)}), file=sys.stderr)
    return 0
