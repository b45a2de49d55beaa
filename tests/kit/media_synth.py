"""Media made in the test: tones, voiced PCM16, WAV/MP3 files, spoken WAV (espeak-ng), images and a PNG bomb; and
measures of what came back (loud seconds, frame gaps). The server's output rates: FPS, OUT_RATE, SPF."""

from __future__ import annotations

import io
import struct
import subprocess
import wave
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


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


def frame_gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


def longest_gap(arrivals: list[float]) -> float:
    return max(frame_gaps(arrivals), default=float("inf"))


FPS = 25


OUT_RATE = 48000


SPF = OUT_RATE // FPS


def tone(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A test signal with no silent stretch: a 220 Hz tone with a little noise (float32, mono)."""
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.02, len(t))
    return (0.3 * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32)


def loud_seconds(audio: np.ndarray, rate: int, block_s: float = 0.02, threshold: float = 0.02) -> float:
    """Seconds of 20 ms blocks whose RMS is above `threshold`: how much sound (speech, a tone) got through."""
    n = int(block_s * rate)
    blocks = audio[: len(audio) // n * n].reshape(-1, n)
    return float((np.sqrt((blocks**2).mean(axis=1)) > threshold).sum() * block_s)
