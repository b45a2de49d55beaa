"""`VExpressVideoService`: a Pipecat frame processor that gives a voice bot a vexpress-rt face.

Placed after the TTS service::

    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts,
                         VExpressVideoService(url="http://127.0.0.1:8080"), transport.output(), assistant_agg])

In: `TTSAudioRawFrame`s are resampled (PyAV) to the session's declared rate and pushed over the bot websocket; a
`TTSStoppedFrame` ends the utterance (`audio.end`); an `InterruptionFrame` sends `interrupt`. None of them is passed
on: the TTS audio is not played a second time.

Out, one pair per frame of the session (frames websocket, one every 1/fps from the server's clock, idle frames
between turns included): an `OutputImageRawFrame` (RGB, `sync_with_audio=True`) then a `SpeechOutputAudioRawFrame`
with exactly that frame's 1/fps of audio (48 kHz mono, silence while idle). The image being queued with the audio,
the output transport shows frame `i` when frame `i`'s audio starts playing: lips and speech stay in sync. Give the
transport `video_out_is_live=False` (it then redraws the current image at `video_out_framerate`) and the session's
fps. Each pair carries `metadata["vexpress"] = {"frame", "speaking", "utterance"}`.

Interruption: the transport's queues are flushed by the `InterruptionFrame` passed downstream; frames already on the
wire from before the server took the `interrupt` are dropped here: a `mark` sent right after the `interrupt` comes
back at the first frame played after it, and until then (and for any older frame) speech frames are discarded, so
what follows the interruption is idle.

Errors: the server's `error` events become `ErrorFrame`s; a server that goes away (sockets closed, no frame for
`frame_timeout_s`, or unreachable at start) becomes an `ErrorFrame` that marks this processor unusable, followed by
an `EndWorkerFrame` that ends the pipeline (unless `end_on_server_loss=False`). The session is closed (`DELETE`) on
`EndFrame` and `CancelFrame`.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import time

import numpy as np
from av.audio.frame import AudioFrame
from av.audio.resampler import AudioResampler
from PIL import Image
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    EndWorkerFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

from . import wire
from .session import AvatarSession, SessionLost, SessionOptions

log = logging.getLogger(__name__)

MARK_PREFIX = "vexpress-interrupt-"
MARK_WAIT_S = 2.0  # an interrupt's mark not back within this: stop discarding (the server answers within a frame)


class _Resampler:
    """PCM16 at any rate/layout -> PCM16 at the session's rate/layout (PyAV); a no-op when they already match."""

    def __init__(self, rate: int, channels: int):
        self.rate, self.channels = rate, channels
        self._resampler: AudioResampler | None = None
        self._source: tuple[int, int] | None = None

    def convert(self, pcm: bytes, rate: int, channels: int) -> bytes:
        if (rate, channels) == (self.rate, self.channels):
            return pcm
        resampler = self._resampler
        if self._source != (rate, channels) or resampler is None:
            self._source = (rate, channels)
            resampler = self._resampler = AudioResampler("s16", _layout(self.channels), self.rate)
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = AudioFrame.from_ndarray(samples, format="s16", layout=_layout(channels))
        frame.sample_rate = rate
        return b"".join(bytes(out.to_ndarray().tobytes()) for out in resampler.resample(frame))

    def flush(self) -> bytes:
        """What the resampler still holds (at the end of an utterance)."""
        if self._resampler is None:
            return b""
        out = b"".join(bytes(f.to_ndarray().tobytes()) for f in self._resampler.resample(None))
        self._resampler, self._source = None, None
        return out


def _layout(channels: int) -> str:
    return "mono" if channels == 1 else "stereo"


def _decode_jpeg(jpeg: bytes) -> tuple[bytes, tuple[int, int]]:
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    return image.tobytes(), image.size


class VExpressVideoService(FrameProcessor):
    """A vexpress-rt avatar as a Pipecat video service (see the module's docstring for the frame mapping).

    Args:
        url: the server's base URL (`http://host:port`).
        api_key: the server's API key, when it has one.
        options: the session's settings (`avatar_id`, `fps`, `steps`, `decoder`, ..., the PCM `sample_rate`
            pushed, `jpeg_quality`); None: the server's defaults, 16 kHz mono.
        connect_timeout_s: bound on opening the session and on closing it.
        frame_timeout_s: no frame from the server for this long means it is gone.
        end_on_server_loss: end the pipeline (`EndWorkerFrame`) after reporting a lost server.
    """

    def __init__(
        self,
        *,
        url: str,
        api_key: str | None = None,
        options: SessionOptions | None = None,
        connect_timeout_s: float = 15.0,
        frame_timeout_s: float = 5.0,
        end_on_server_loss: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._session = AvatarSession(
            url, api_key, options, connect_timeout_s=connect_timeout_s, frame_timeout_s=frame_timeout_s
        )
        self._end_on_server_loss = end_on_server_loss
        self._open_error: Exception | None = None
        self._resampler: _Resampler | None = None
        self._audio_sent = False  # audio pushed since the last `audio.end`
        self._tasks: list[asyncio.Task] = []
        self._marks = itertools.count(1)
        self._pending_mark: str | None = None  # the interrupt's mark, until it comes back
        self._pending_since = 0.0
        self._cutoff = -1  # speech frames before this index were cut by an interrupt
        self._lost = False
        self._closed = False

    @property
    def session(self) -> AvatarSession:
        """The session (its `info`, `ready` and `stream` replies), for logging and tests."""
        return self._session

    # -- lifecycle ------------------------------------------------------------------------------------------------
    # FrameProcessor.setup narrows BaseObject.setup(task_manager) the same way: pipecat's own signature
    async def setup(self, setup: FrameProcessorSetup):  # type: ignore[override]
        await super().setup(setup)
        try:
            await self._session.open()
            self._resampler = _Resampler(self._session.sample_rate, self._session.channels)
        except SessionLost as exc:
            self._open_error = exc  # reported once the pipeline has started and an ErrorFrame can travel

    async def cleanup(self):
        await super().cleanup()
        await self._close()

    async def _start(self) -> None:
        if self._open_error is not None:
            await self._server_lost(self._open_error)
            return
        self._tasks = [self.create_task(self._read_frames()), self.create_task(self._read_events())]

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            if task is not asyncio.current_task():
                await self.cancel_task(task)
        self._tasks = []
        await self._session.close()

    async def _server_lost(self, exc: Exception) -> None:
        if self._lost or self._closed:
            return
        self._lost = True
        await self.push_error(f"vexpress-rt: {exc}", exception=exc, force_treat_as_permanent=True)
        if self._end_on_server_loss:
            await self.push_frame(EndWorkerFrame(reason=f"vexpress-rt server lost: {exc}"))

    # -- frames in --------------------------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._close()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._send_audio(frame)
        elif isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._end_utterance()
        elif isinstance(frame, TTSStartedFrame) and direction == FrameDirection.DOWNSTREAM:
            pass  # an utterance opens with its first audio; the avatar's own audio marks when the bot speaks
        else:
            await self.push_frame(frame, direction)

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        if self._lost or self._resampler is None:
            return
        pcm = self._resampler.convert(frame.audio, frame.sample_rate, frame.num_channels)
        try:
            if pcm:
                await self._session.send_audio(pcm)
                self._audio_sent = True
        except SessionLost as exc:
            await self._server_lost(exc)

    async def _end_utterance(self) -> None:
        if self._lost or self._resampler is None:
            return
        try:
            if tail := self._resampler.flush():
                await self._session.send_audio(tail)
                self._audio_sent = True
            if self._audio_sent:
                await self._session.end_utterance()
                self._audio_sent = False
        except SessionLost as exc:
            await self._server_lost(exc)

    async def _interrupt(self) -> None:
        # Set before any await: a pair being pushed right now is checked against it.
        self._pending_mark = f"{MARK_PREFIX}{next(self._marks)}"
        self._pending_since = time.monotonic()
        if self._lost or self._resampler is None:
            return
        self._resampler.flush()  # what it held belongs to the utterance being cut
        self._audio_sent = False
        try:
            await self._session.interrupt()
            await self._session.mark(self._pending_mark)
        except SessionLost as exc:
            await self._server_lost(exc)

    # -- frames out -------------------------------------------------------------------------------------------------
    def _cut(self, index: int, speaking: bool) -> bool:
        """Whether a frame belongs to speech an interrupt cut (checked right before each push)."""
        if not speaking:
            return False
        if self._pending_mark is not None:
            if time.monotonic() - self._pending_since < MARK_WAIT_S:
                return True
            log.warning("vexpress-rt: no answer to %s within %.1f s", self._pending_mark, MARK_WAIT_S)
            self._pending_mark = None
        return index < self._cutoff

    async def _read_frames(self) -> None:
        try:
            async for f in self._session.frames():
                if self._cut(f.index, f.speaking):
                    continue
                rgb, size = await asyncio.to_thread(_decode_jpeg, f.jpeg)
                meta = {"frame": f.index, "speaking": f.speaking, "utterance": f.utterance}
                image = OutputImageRawFrame(image=rgb, size=size, format="RGB")
                image.sync_with_audio = True
                image.metadata["vexpress"] = meta
                audio = SpeechOutputAudioRawFrame(audio=f.audio.tobytes(), sample_rate=f.sample_rate, num_channels=1)
                audio.metadata["vexpress"] = meta
                if self._cut(f.index, f.speaking):  # an interrupt came while decoding
                    continue
                await self.push_frame(image)
                if self._cut(f.index, f.speaking):
                    continue
                await self.push_frame(audio)
        except SessionLost as exc:
            await self._server_lost(exc)

    async def _read_events(self) -> None:
        try:
            async for event in self._session.events():
                kind = event.get("type")
                if kind == wire.MARK and event.get("name") == self._pending_mark:
                    self._cutoff = int(event.get("frame", self._cutoff))
                    self._pending_mark = None
                elif kind == wire.ERROR:
                    # With a `frame`, the session is ending (engine or lifetime error): the sockets close next and
                    # the loss is reported then; without, a message was refused and the session goes on.
                    await self.push_error(f"vexpress-rt error {event.get('code')}: {event.get('message')}")
        except SessionLost as exc:
            await self._server_lost(exc)
