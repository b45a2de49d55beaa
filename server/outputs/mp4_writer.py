"""Frames in, H.264 + AAC out with PyAV: an MP4 file (the recorder, recording.py) or a live ingest URL (outputs/).

A module of its own, light to import (PyAV, NumPy), because a live output runs it in a child process
(outputs/encoder_process.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import OutputContainer
from av.video.stream import VideoStream

from streaming.frames import AVFrame

AAC_BLOCK = 1024
X264_OPTIONS = {"preset": "veryfast", "crf": "23"}


@dataclass(frozen=True)
class EncodeSpec:
    """How `Mp4Writer` encodes: an MP4 file by default; a live ingest (server/outputs/) names its muxer, bitrates,
    keyframe interval and a network timeout."""

    format: str | None = None  # None: from the file name
    video_options: dict = field(default_factory=lambda: dict(X264_OPTIONS))
    video_bit_rate: int | None = None  # bits/s; None: the options' quality (crf)
    gop_frames: int | None = None  # keyframe interval; None: the encoder's default
    audio_bit_rate: int | None = None
    timeout_s: float | None = None  # opening and each write (a network target)


@dataclass
class _Output:
    """The open MP4: its container and streams, and the engine index of the first frame (pts 0)."""

    container: OutputContainer
    video: VideoStream
    audio: AudioStream
    first: int


class Mp4Writer:
    """Frames in (any thread, one at a time), an MP4 out. Frame `i` is written at pts `i - first index`; its audio
    at sample `(i - first) * samples_per_frame`, silence filling any gap, so audio and video stay on one clock."""

    def __init__(self, path: Path | str, fps: int, spec: EncodeSpec | None = None):
        self.path = path
        self.fps = fps
        self.spec = spec or EncodeSpec()
        self.bytes_out = 0  # encoded bytes handed to the muxer
        self._out: _Output | None = None  # opened by the first frame
        self.first: int | None = None
        self.last = -1
        self.frames = 0
        self.speech_frames = 0
        self.audio_samples = 0  # samples handed to the encoder, silence included
        self._pending = np.zeros(0, np.float32)
        self._pending_start = 0  # sample position of _pending[0]

    def _open(self, frame: AVFrame) -> _Output:
        height, width = frame.image.shape[:2]
        spec = self.spec
        container = av.open(str(self.path), mode="w", format=spec.format, timeout=spec.timeout_s)
        v = container.add_stream("libx264", rate=self.fps, options=dict(spec.video_options))
        v.width, v.height, v.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        v.codec_context.time_base = Fraction(1, self.fps)
        if spec.video_bit_rate:
            v.bit_rate = spec.video_bit_rate
        if spec.gop_frames:
            v.codec_context.gop_size = spec.gop_frames
        a = container.add_stream("aac", rate=frame.sample_rate)
        a.layout = "mono"
        if spec.audio_bit_rate:
            a.bit_rate = spec.audio_bit_rate
        self.first = frame.index
        self._out = _Output(container, v, a, frame.index)
        return self._out

    def write(self, frames: list[AVFrame]) -> None:
        for frame in frames:
            out = self._out or self._open(frame)
            if frame.index <= self.last:
                continue
            self.last = frame.index
            pts = frame.index - out.first
            image = frame.image
            if image.shape[0] % 2 or image.shape[1] % 2:
                image = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), mode="edge")
            video = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            video.pts, video.time_base = pts, Fraction(1, self.fps)
            self._mux(out, out.video.encode(video))
            self.frames += 1
            self.speech_frames += bool(frame.speaking)
            position = (pts - frame.skipped_audio_frames) * frame.samples_per_frame  # a burst starts earlier
            end = self._pending_start + len(self._pending)
            audio = np.asarray(frame.audio, np.float32) / 32768.0
            if position > end:
                audio = np.concatenate([np.zeros(position - end, np.float32), audio])
            self._pending = np.concatenate([self._pending, audio])
            self._encode_audio(out, final=False)

    def _encode_audio(self, out: _Output, final: bool) -> None:
        rate = out.audio.rate
        while len(self._pending) >= AAC_BLOCK or (final and len(self._pending)):
            block, self._pending = self._pending[:AAC_BLOCK], self._pending[AAC_BLOCK:]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block[None]), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, self._pending_start, Fraction(1, rate)
            self._mux(out, out.audio.encode(frame))
            self._pending_start += len(block)
            self.audio_samples += len(block)

    def _mux(self, out: _Output, packets: list[av.Packet]) -> None:
        self.bytes_out += sum(p.size for p in packets)
        out.container.mux(packets)

    def close(self) -> None:
        out = self._out
        if out is None:
            return
        try:
            self._encode_audio(out, final=True)
            out.container.mux(out.video.encode(None))
            out.container.mux(out.audio.encode(None))
        finally:
            out.container.close()

    @property
    def duration_s(self) -> float:
        return 0.0 if self.first is None else (self.last - self.first + 1) / self.fps
