"""A session's output as WebRTC tracks: one pacing task reads the engine, every track reads from it.

```
FrameClock ──► MediaPump (one per session): frame i = session.read_frame() at t0 + i/fps
                   │ fan-out, one bounded queue per track (drop oldest, counted)
                   ├─► AvatarVideoTrack.recv(): av.VideoFrame rgb24, pts = i, time_base = 1/fps
                   └─► AvatarAudioTrack.recv(): av.AudioFrame s16 mono, 20 ms, pts in samples from i * spf
```
All timing comes from the pump's clock: video frame `i` and the audio of frame `i` are released at the same instant
and carry the same time on their own time base, so a receiver's lip sync (RTCP sender reports) lines them up.
Any number of peer connections (the publisher and WHEP viewers) subscribe to the same pump.

`read_frame` composes presenter frames (docs/framing.md: 1080p cut-out ~16 ms a frame on a CPU core). A session
whose frames are composed (`read_off_loop`) is read through the pump's own one-thread executor, so the event loop
(every session's websockets and RTP pacing) never waits for it; the frames keep their order (one thread), and the
events `read_frame` emits reach the loop (listeners are thread-safe) before the frame is queued.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.frames import AVFrame

from . import marks
from .clock import FrameClock

log = logging.getLogger("server.media.pump")

PACKET_S = Fraction(1, 50)  # 20 ms audio packets, what Opus sends


class FrameQueue:
    """A bounded queue of frames for one track; when full the oldest frame is dropped and counted."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.dropped = 0
        self._items: collections.deque[AVFrame] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, frame: AVFrame) -> None:
        if self._closed:
            return
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(frame)
        self._ready.set()

    async def get(self) -> AVFrame:
        while not self._items:
            if self._closed:
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def close(self) -> None:
        self._closed = True
        self._ready.set()


@dataclass
class AudioPacket:
    position: int  # samples since the start of the session's output stream
    samples: np.ndarray  # int16 (n,) mono
    sample_rate: int


class AudioRechunker:
    """Cuts the audio of consecutive AVFrames into fixed 20 ms packets, positioned on the output stream.

    Frame `i` holds samples `[i * n, (i + 1) * n)`; packets keep those positions, so their pts stay on the video's
    clock. A missing frame (dropped for a slow receiver) restarts the packet grid at the next frame: the receiver
    sees a gap in pts, never audio moved in time.
    """

    def __init__(self):
        self._buffer = np.zeros(0, dtype=np.int16)
        self._position: int | None = None  # stream position of self._buffer[0]
        self._rate: int | None = None

    def push(self, frame: AVFrame) -> list[AudioPacket]:
        audio = np.asarray(frame.audio, dtype=np.int16).reshape(-1)
        start = frame.audio_start  # after a late reader's skip the audio begins with the skipped frames' (a burst)
        if self._position is None or self._rate != frame.sample_rate or start != self._position + len(self._buffer):
            self._buffer, self._position, self._rate = audio[:0], start, frame.sample_rate
        self._buffer = np.concatenate([self._buffer, audio])
        size = int(frame.sample_rate * PACKET_S)
        packets = []
        while len(self._buffer) >= size:
            packets.append(AudioPacket(self._position, self._buffer[:size].copy(), frame.sample_rate))
            self._buffer = self._buffer[size:]
            self._position += size
        return packets


class MediaPump:
    """The one task per session that calls `session.read_frame()` once per frame period and fans the frame out."""

    def __init__(
        self,
        session,
        fps: float,
        queue_frames: int = 6,
        mark_frames: bool = False,
        logger=None,
        on_failure=None,
        on_queued: Callable[[int], None] | None = None,
        read_off_loop: bool = False,
    ):
        self.session = session
        self._on_failure = on_failure  # (reason) -> None: called when reading the engine fails
        self._on_queued = on_queued  # (frames in the queue) -> None: after each put (the depth histogram)
        self.fps = float(fps)
        self.clock = FrameClock(fps)
        self.queue_frames = queue_frames
        self.mark_period = max(1, round(self.fps)) if mark_frames else 0
        self.log = logger or log
        self.frames = 0  # frames read from the engine
        self.late_frames = 0  # frames read more than one period after they were due
        self.last_late_s = 0.0
        self.index_offset = 0  # engine frame index of the pump's frame 0 (moved on by frames the engine skipped)
        self._subscribers: list[FrameQueue] = []
        self._dropped_gone = 0  # drops counted by queues that have been unsubscribed
        self._times: collections.deque[float] = collections.deque(maxlen=2 * max(1, round(self.fps)))
        self._task: asyncio.Task | None = None
        self._closed = False
        # composed frames are read in this thread, off the event loop (None: read on the loop, a few microseconds)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"pump-{session.id}") if read_off_loop else None

    # -- subscribers -------------------------------------------------------------------------------------------
    def subscribe(self, maxsize: int | None = None) -> FrameQueue:
        """A queue of every frame from now on (`maxsize` frames, default `queue_frames`; a full queue drops its
        oldest). Starts the clock on the first call."""
        queue = FrameQueue(maxsize or self.queue_frames)
        if self._closed:
            queue.close()
            return queue
        self._subscribers.append(queue)
        self.start()
        return queue

    def start(self) -> None:
        """Run the session's clock (read a frame every period) even with no subscriber: a websocket bot's audio
        plays, and its playback events come, with or without a viewer."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"pump-{self.session.id}")

    def unsubscribe(self, queue: FrameQueue) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)
            self._dropped_gone += queue.dropped
        queue.close()

    # -- the loop ----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        period = 1.0 / self.fps
        n = 0
        try:
            while not self._closed:
                await self.clock.wait(n)
                late = self.clock.late_by(n)
                frame: AVFrame = await self._read()
                # The engine index of pump frame 0 as the pump's clock sees it now: when a late pump made the
                # engine skip frames, the indexes run ahead and the audio track, which waits for an index's due
                # time, would wait that much longer for every packet and lose speech in its full queue.
                self.index_offset = frame.index - n
                if self.mark_period:
                    frame = marks.mark_frame(frame, self.mark_period)
                for queue in self._subscribers:
                    queue.put(frame)
                    if self._on_queued is not None:
                        self._on_queued(len(queue))
                self.frames += 1
                self.last_late_s = late
                if late > period:
                    self.late_frames += 1
                self._times.append(time.monotonic())
                n += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("the media pump stopped: reading the engine failed")
            if self._on_failure is not None:
                self._on_failure(f"the session's frames stopped: {type(exc).__name__}: {exc}")
        finally:
            for queue in list(self._subscribers):
                queue.close()

    @property
    def reads_off_loop(self) -> bool:
        return self._reader is not None

    async def _read(self) -> AVFrame:
        if self._reader is None:
            frame: AVFrame = self.session.read_frame()
            return frame
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.session.read_frame)

    def due(self, engine_index: float) -> float:
        """Wall-clock (monotonic) time at which engine frame `engine_index` (fractional: within a frame) is due."""
        return self.clock.due(engine_index - self.index_offset)

    async def wait(self, engine_index: float) -> None:
        await self.clock.wait(engine_index - self.index_offset)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for queue in list(self._subscribers):
            self.unsubscribe(queue)
        if self._reader is not None:
            self._reader.shutdown(wait=False)

    # -- measurements ------------------------------------------------------------------------------------------
    @property
    def measured_fps(self) -> float:
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0

    @property
    def dropped(self) -> int:
        return self._dropped_gone + sum(q.dropped for q in self._subscribers)

    def queue_depths(self) -> list[int]:
        return [len(q) for q in self._subscribers]


class PumpTrack(MediaStreamTrack):
    """A track that reads the pump's frames. It subscribes when its sender first asks for a frame: aiortc stops
    (and so lets unsubscribe) only senders it started, so a track subscribed when built would stay subscribed
    forever for an offer that fails or a peer that never connects."""

    def __init__(self, pump: MediaPump):
        super().__init__()
        self._pump = pump
        self._queue: FrameQueue | None = None

    async def _next_frame(self) -> AVFrame:
        if self._queue is None:
            self._queue = self._pump.subscribe()
        return await self._queue.get()

    def stop(self) -> None:
        super().stop()
        if self._queue is not None:
            self._pump.unsubscribe(self._queue)


class AvatarVideoTrack(PumpTrack):
    """The avatar's video for one peer connection: frame `i` as a yuv420p VideoFrame, pts `i`, time base 1/fps
    (converted here by OpenCV, 5x cheaper than the encoder's own swscale conversion of an rgb24 frame)."""

    kind = "video"

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._next_frame()
        yuv = np.asarray(cv2.cvtColor(np.ascontiguousarray(frame.image), cv2.COLOR_RGB2YUV_I420), np.uint8)  # BT.601
        video = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        video.pts = frame.index
        video.time_base = frame.time_base
        return video


class AvatarAudioTrack(PumpTrack):
    """The avatar's audio for one peer connection: the frames' audio as 20 ms s16 mono packets, pts in samples.

    Packet `k` of a frame is released at that frame's due time plus `k` * 20 ms, so audio leaves at the pace of
    the clock, like the video.
    """

    kind = "audio"

    def __init__(self, pump: MediaPump):
        super().__init__(pump)
        self._rechunker = AudioRechunker()
        self._packets: collections.deque[AudioPacket] = collections.deque()
        self._samples_per_frame = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        while not self._packets:
            frame = await self._next_frame()
            self._samples_per_frame = frame.samples_per_frame
            self._packets.extend(self._rechunker.push(frame))
        packet = self._packets.popleft()
        await self._pump.wait(packet.position / self._samples_per_frame)
        audio = av.AudioFrame.from_ndarray(packet.samples[None, :], format="s16", layout="mono")
        audio.sample_rate = packet.sample_rate
        audio.pts = packet.position
        audio.time_base = Fraction(1, packet.sample_rate)
        return audio
