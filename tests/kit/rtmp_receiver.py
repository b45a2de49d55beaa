"""A real RTMP ingest on loopback (tests/kit/rtmp_ingest.py in a process of its own) and what it recorded, decoded."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kit.media_synth import FPS, OUT_RATE
from server.media import marks


class RtmpIngest:
    """`tests/kit/rtmp_ingest.py` in a process of its own: an RTMP server (FFmpeg's listen mode via PyAV) that records
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
