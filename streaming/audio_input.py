"""Pushed audio in any rate and channel count -> 16 kHz mono for the model and output-rate mono for playback.

Both outputs come from the same samples through two PyAV (libswresample) resamplers, so the audio a frame plays
is the audio that drove it, just at the rate the transport wants.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from vexpress_rt.errors import InputError
from vexpress_rt.media import StreamResampler

MODEL_RATE = 16000
MAX_RATE = 192000
MAX_CHANNELS = 8


def validate_format(sample_rate: int, channels: int) -> None:
    if not isinstance(sample_rate, int) or not 8000 <= sample_rate <= MAX_RATE:
        raise InputError(f"sample rate must be an integer from 8000 to {MAX_RATE} Hz, got {sample_rate!r}")
    if not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise InputError(f"channel count must be an integer from 1 to {MAX_CHANNELS}, got {channels!r}")


PcmInput = bytes | bytearray | memoryview | np.ndarray  # PCM16 LE interleaved bytes, or an int16/float array


def to_float_frames(pcm: PcmInput, channels: int) -> np.ndarray:
    """PCM16 LE interleaved bytes, or an int16/float array (n,) / (n, channels) -> float32 (n, channels)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = bytes(pcm)
        if len(raw) % (2 * channels):
            raise InputError(
                f"PCM16 data must be a whole number of {channels}-channel samples ({2 * channels} bytes each), "
                f"got {len(raw)} bytes"
            )
        data = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    else:
        data = np.asarray(pcm)
        if data.ndim == 1:
            if channels != 1:
                if data.size % channels:
                    raise InputError(f"{data.size} interleaved samples do not split into {channels} channels")
                data = data.reshape(-1, channels)
            else:
                data = data[:, None]
        if data.ndim != 2 or data.shape[1] != channels:
            raise InputError(f"audio array of shape {data.shape} does not have {channels} channel(s)")
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    if data.dtype.kind == "f":
        out = data.astype(np.float32)
        if not np.isfinite(out).all():
            raise InputError("audio samples must be finite numbers")
        return np.clip(out, -1.0, 1.0)
    raise InputError(f"audio samples must be int16 or float, got {data.dtype}")


class AudioInput:
    """One continuous input stream. `push` returns (16 kHz mono float32, output-rate mono int16)."""

    def __init__(self, sample_rate: int, channels: int, output_rate: int):
        validate_format(sample_rate, channels)
        self.sample_rate, self.channels, self.output_rate = sample_rate, channels, output_rate
        self._to_model = StreamResampler(1, sample_rate, MODEL_RATE)
        self._to_output = StreamResampler(1, sample_rate, output_rate)

    def push(
        self,
        pcm: PcmInput,
        sample_rate: int | None = None,
        channels: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        sample_rate = self.sample_rate if sample_rate is None else sample_rate
        channels = self.channels if channels is None else channels
        if (sample_rate, channels) != (self.sample_rate, self.channels):
            raise InputError(
                f"audio format changed mid-utterance ({self.sample_rate} Hz x{self.channels} -> "
                f"{sample_rate} Hz x{channels}); end the utterance first"
            )
        mono = to_float_frames(pcm, channels).mean(axis=1)[None]
        return self._to_model.push(mono)[0], _to_int16(self._to_output.push(mono)[0])

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        return self._to_model.flush()[0], _to_int16(self._to_output.flush()[0])


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


class SampleFifo:
    """Samples in arrival order: append pieces, take from the front, without copying what stays (a bot may
    push minutes ahead in 20 ms pieces)."""

    def __init__(self, dtype: type[np.generic] = np.int16):
        self._chunks: deque[np.ndarray] = deque()
        self._head = 0  # samples of the first chunk already taken
        self._dtype = dtype
        self.size = 0

    def append(self, samples: np.ndarray) -> None:
        if len(samples):
            self._chunks.append(samples)
            self.size += len(samples)

    def take(self, n: int) -> np.ndarray:
        parts, need = [], n
        while need and self._chunks:
            rest = self._chunks[0][self._head :]
            part = rest[:need]
            parts.append(part)
            need -= len(part)
            if len(part) == len(rest):
                self._chunks.popleft()
                self._head = 0
            else:
                self._head += len(part)
        self.size -= n - need
        return np.concatenate(parts) if parts else np.zeros(0, self._dtype)
