"""Diagnostic marks (`--mark_frames`) that let a receiver measure A/V offset from the media alone.

* Video: the frame index, 16 bits, as a row of 16 black/white blocks across the top of the image (MSB first).
* Audio: every `period` frames (about once a second), the first 10 ms of that frame's audio are replaced by a
  2 -> 6 kHz chirp, which survives Opus and is found by a matched filter.

A receiver maps both to the sender's clock (RTCP sender reports) and compares the chirp of frame `k` with video
frame `k`: the difference is the A/V offset a player would show.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from streaming.frames import AVFrame

BITS = 16
CHIRP_S = 0.010
CHIRP_F0, CHIRP_F1 = 2000.0, 6000.0
CHIRP_AMPLITUDE = 0.5


def band_height(height: int) -> int:
    return max(8, height // 16)


def stamp_index(image: np.ndarray, index: int) -> np.ndarray:
    """A copy of `image` with `index` written as a barcode in its top rows."""
    out = np.array(image, copy=True)
    height, width = out.shape[:2]
    bh, bw = band_height(height), width // BITS
    for bit in range(BITS):
        on = (index >> (BITS - 1 - bit)) & 1
        out[:bh, bit * bw : (bit + 1) * bw] = 255 if on else 0
    return out


def read_index(image: np.ndarray) -> int:
    """The index written by `stamp_index`, from an RGB or grey (luma) image, after lossy coding."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    height, width = grey.shape
    bh, bw = band_height(height), width // BITS
    value = 0
    for bit in range(BITS):
        block = grey[bh // 4 : bh - bh // 4, bit * bw + bw // 4 : (bit + 1) * bw - bw // 4]
        value = (value << 1) | int(block.mean() > 127)
    return value


def chirp(sample_rate: int) -> np.ndarray:
    """The audio mark: float32 in [-1, 1], CHIRP_S long, with 1 ms fades."""
    n = int(round(CHIRP_S * sample_rate))
    t = np.arange(n) / sample_rate
    phase = 2 * np.pi * (CHIRP_F0 * t + (CHIRP_F1 - CHIRP_F0) * t**2 / (2 * CHIRP_S))
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.001 * sample_rate))
    return (CHIRP_AMPLITUDE * np.sin(phase) * fade).astype(np.float32)


def mark_frame(frame: AVFrame, period: int) -> AVFrame:
    """The frame with its index in the picture and, every `period` frames, a chirp at the start of its audio."""
    audio = frame.audio
    if frame.index % period == 0:
        mark = (chirp(frame.sample_rate) * 32767).astype(np.int16)
        audio = np.array(audio, copy=True)
        start = len(audio) - frame.samples_per_frame  # the frame's own audio (after a late reader's burst)
        n = min(len(mark), len(audio) - start)
        audio[start : start + n] = mark[:n]
    return replace(frame, image=stamp_index(frame.image, frame.index), audio=audio)


def find_chirps(
    signal: np.ndarray, sample_rate: int, threshold: float = 0.6, min_gap_s: float = 0.5, block: int = 1 << 20
) -> list[int]:
    """Sample positions where a chirp starts in `signal` (mono, any scale): normalised matched-filter peaks.
    Works through long signals in blocks, so memory stays bounded."""
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    template = chirp(sample_rate).astype(np.float64)
    n = len(template)
    size = 1 << int(np.ceil(np.log2(block + n)))
    spectrum = np.conj(np.fft.rfft(template, size))
    scores = np.zeros(max(0, len(x) - n + 1))
    for start in range(0, len(scores), block):
        piece = x[start : start + block + n - 1]
        corr = np.fft.irfft(np.fft.rfft(piece, size) * spectrum, size)[: len(piece) - n + 1]
        energy = np.convolve(piece * piece, np.ones(n), mode="valid")
        scores[start : start + len(corr)] = corr / (np.sqrt(np.maximum(energy, 1e-12)) * np.linalg.norm(template))
    found: list[int] = []
    gap = int(min_gap_s * sample_rate)
    candidates = np.flatnonzero(scores > threshold)
    i = 0
    while i < len(candidates):
        start = candidates[i]
        window = candidates[(candidates >= start) & (candidates < start + n)]
        best = int(window[np.argmax(scores[window])])
        if not found or best - found[-1] >= gap:
            found.append(best)
        i = np.searchsorted(candidates, start + n)
    return found
