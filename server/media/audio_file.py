"""Audio files from clients (`/speak`, script items, TTS output), decoded straight to what a session plays.

A file is decoded frame by frame, each frame averaged to mono (as the engine averages pushed channels) and
resampled to the session's output rate (PyAV's libswresample), then kept as int16: what the session plays, and
at most 2 bytes a sample whatever the file's own rate and channel count (a 192 kHz 7.1 file decoded at its own
rate in float32 took 64x more). The samples are counted against byte budgets while they are decoded, so a small
file that expands is refused before it holds more than its budget (`BudgetExceeded`), and they are given back
when the holder releases the file (`DecodedFile.release`).
"""

from __future__ import annotations

import asyncio
import io
import threading

import av
import numpy as np

from streaming.audio_input import MAX_CHANNELS, MAX_RATE
from streaming.session_config import SessionConfig
from vexpress_rt.media import StreamResampler, frame_to_float

from ..access.sniff import audio_demuxer
from ..errors import ApiError

DEFAULT_RATE = SessionConfig.output_sample_rate  # the sessions' default output rate
SAMPLE_BYTES = 2  # int16 mono
_GROW_SAMPLES = 1 << 16  # the decode buffer starts this large and doubles


class BudgetExceeded(ApiError):
    """Decoded audio over a byte budget: 413 when the file alone is too large for it, else 503 (try later)."""

    def __init__(self, budget: ByteBudget, own: int):
        self.budget = budget
        alone = own > budget.limit  # the file alone needs more than the whole budget
        held = f"{budget.held / 2**20:.1f} MiB held, " if not alone else ""
        message = (
            f"decoded audio over the {budget.what} budget ({held}{budget.limit / 2**20:g} MiB at most, "
            f"--{budget.setting})"
        )
        if alone:
            super().__init__(413, message, code="payload_too_large")
        else:
            super().__init__(503, message + "; try again later", code="busy", headers={"Retry-After": "5"})


class ByteBudget:
    """Bytes of decoded audio held against a limit; a script's budget also draws on the server's (its parent).
    Thread-safe: files are decoded in worker threads."""

    def __init__(self, limit: int, what: str, setting: str, parent: ByteBudget | None = None):
        self.limit, self.what, self.setting, self.parent = limit, what, setting, parent
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int, own: int) -> None:
        """Hold `n` more bytes for a holder that then holds `own`, or BudgetExceeded (nothing taken) when this
        budget or its parent has no room."""
        with self._lock:
            if self.held + n > self.limit:
                raise BudgetExceeded(self, own)
            if self.parent is not None:
                self.parent.take(n, own)
            self.held += n

    def room(self) -> int:
        """Bytes that could still be taken (here and in the parents)."""
        with self._lock:
            mine = self.limit - self.held
        return min(mine, self.parent.room()) if self.parent is not None else mine

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n
            if self.parent is not None:
                self.parent.give(n)


class DecodedFile:
    """Mono int16 samples at the rate they were decoded to, counted against a budget until `release()`."""

    channels = 1

    def __init__(self, samples: np.ndarray, sample_rate: int, budget: ByteBudget | None = None, source=(0, 0)):
        self.samples = samples  # int16 (n, 1)
        self.sample_rate = sample_rate
        self.source_rate, self.source_channels = source  # the file's own format
        self.duration_ms = 1000.0 * len(samples) / sample_rate
        self._budget = budget
        self._held = samples.nbytes if budget is not None else 0

    @property
    def nbytes(self) -> int:
        return int(self.samples.nbytes)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def piece(self, start: int, n: int) -> np.ndarray:
        return self.samples[start : start + n]

    def release(self) -> None:
        """Drop the samples and give their bytes back (once; the duration stays known)."""
        self.samples = np.zeros((0, 1), np.int16)
        if self._budget is not None and self._held:
            self._budget.give(self._held)
        self._held = 0


class _Collector:
    """A growing int16 buffer whose capacity is what the budget holds (no list of small chunks to concatenate:
    their copies and the allocator's leftovers cost more than the audio)."""

    def __init__(self, budget: ByteBudget | None, max_samples: int):
        self.budget, self.max_samples = budget, max_samples
        self.buffer = np.zeros(0, np.int16)
        self.size = 0
        self.held = 0

    def _resize(self, capacity: int) -> None:
        wanted = capacity * SAMPLE_BYTES
        if self.budget is not None and wanted > self.held:
            self.budget.take(wanted - self.held, wanted)
        grown = np.empty(capacity, np.int16)
        grown[: self.size] = self.buffer[: self.size]
        self.buffer = grown
        if self.budget is not None and wanted < self.held:
            self.budget.give(self.held - wanted)
        self.held = wanted

    def add(self, samples: np.ndarray) -> None:
        end = self.size + len(samples)
        if end > len(self.buffer):
            # doubling, but never past the duration limit or what the budget can still give: a file that fits is
            # not refused for the slack of a doubled buffer
            room = (self.held + self.budget.room()) // SAMPLE_BYTES if self.budget is not None else self.max_samples
            self._resize(max(end, min(max(2 * len(self.buffer), _GROW_SAMPLES), self.max_samples, room)))
        self.buffer[self.size : end] = samples
        self.size = end

    def finish(self, rate: int, source: tuple[int, int]) -> DecodedFile:
        if self.size < len(self.buffer):
            self._resize(self.size)  # give back the slack
        return DecodedFile(self.buffer.reshape(-1, 1), rate, self.budget, source)

    def drop(self) -> None:
        self.buffer = np.zeros(0, np.int16)
        if self.budget is not None and self.held:
            self.budget.give(self.held)
        self.held = 0


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


class Cancelled(Exception):
    """The decode was given up by its caller (the script stopped, the session closed)."""


def decode_audio_bytes(
    data: bytes,
    max_seconds: float,
    rate: int = DEFAULT_RATE,
    budget: ByteBudget | None = None,
    cancel: threading.Event | None = None,
) -> DecodedFile:
    """The first audio stream of an in-memory file as mono int16 at `rate`. ApiError: 415 for a container outside
    the allow-list or a format the engine does not take, 400 for an unreadable file, 413 beyond `max_seconds`,
    BudgetExceeded beyond `budget`; `Cancelled` once `cancel` is set (checked between frames)."""
    limit = int(max_seconds * rate)
    out = _Collector(budget, limit)
    resampler: StreamResampler | None = None
    channels = 0
    try:
        with av.open(io.BytesIO(data), mode="r", format=audio_demuxer(data)) as container:
            if not container.streams.audio:
                raise ApiError(415, "the file has no audio stream", code="unsupported_media_type")
            for frame in container.decode(container.streams.audio[0]):
                if resampler is None:
                    channels = frame.layout.nb_channels
                    _check_format(frame.sample_rate, channels)
                    resampler = StreamResampler(1, frame.sample_rate, rate)
                elif (frame.sample_rate, frame.layout.nb_channels) != (resampler.from_rate, channels):
                    raise ApiError(400, "the audio format changes mid-file", code="invalid_audio")
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                mono = frame_to_float(frame).mean(axis=0, keepdims=True)
                out.add(_to_int16(resampler.push(mono)[0]))
                if out.size > limit:
                    raise ApiError(413, f"the audio is longer than {max_seconds:g} s", code="payload_too_large")
            if resampler is not None:
                out.add(_to_int16(resampler.flush()[0]))
    except av.FFmpegError as exc:
        out.drop()
        raise ApiError(400, f"not a readable audio file (WAV, MP3, OGG...): {exc}", code="invalid_audio") from exc
    except BaseException:
        out.drop()
        raise
    if out.size == 0:
        out.drop()
        raise ApiError(400, "the file holds no audio samples", code="invalid_audio")
    return out.finish(rate, (resampler.from_rate if resampler else 0, channels))


async def decode_off_loop(data: bytes, max_seconds: float, rate: int, budget: ByteBudget | None = None) -> DecodedFile:
    """`decode_audio_bytes` in the loop's default executor. When the caller is cancelled the decode stops at its next
    frame, and a result that was finished anyway is released: nothing stays counted against the budget."""
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, decode_audio_bytes, data, max_seconds, rate, budget, cancel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        future.add_done_callback(_release_result)
        raise


def _release_result(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


def _check_format(rate: int, channels: int) -> None:
    if not 8000 <= rate <= MAX_RATE or not 1 <= channels <= MAX_CHANNELS:
        raise ApiError(
            415,
            f"unsupported audio: {rate} Hz, {channels} channels (8000-{MAX_RATE} Hz, 1-{MAX_CHANNELS} channels)",
            code="unsupported_media_type",
        )
