"""A tiny random V-Express in the released folder layout, plus a portrait and speech, built by the tests themselves.

The sizes follow the golden fixture set (`vexpress-tiny`, README section 1.2), so the suite runs at the same speed
with or without `../shared`: UNets [32, 32, 32, 64] with 8 heads, guider out 32, audio projection 32 -> 16 (12 x 64)
-> 768, VAE [8, 16, 16, 16], wav2vec2 32 wide with 2 layers. Values are seeded random, drawn the way the fixtures'
were (weights ~ N(0, 1/fan_in), norm gains 1 + N(0, 0.1), biases N(0, 0.05)), so every conditioning path changes
the output; `motion_module.bin` carries values that differ from those inside `denoising_unet.bin`, as in the
fixture set, so loading the two files in the wrong order shows.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from streaming.bench.demo_model import write_model_folder

# Bump when anything below changes what is written: the pytest cache is keyed by it, so a stale folder is rebuilt.
BUILD_VERSION = "tiny-v5"
SEED = 1234
WIDTH, HEIGHT = 128, 64
SPEECH_SECONDS = 1.3
SAMPLE_RATE = 16000

# Key points of the drawn portrait, (x, y) in the 128 x 64 frame: image-left eye, image-right eye, nose, mouth corners.
REFERENCE_KPS = np.array([[52, 24], [76, 24], [64, 36], [55, 47], [73, 47]], dtype=np.float32)

# The model folder is written by the same code as `vexpress-rt make-demo-model` (streaming/bench/demo_model.py).


def build_model_dir(root: Path, seed: int = SEED) -> Path:
    """Write the tiny model folder at `root` (which must not exist yet) in the released layout."""
    return write_model_folder(root, seed)


def portrait_image(size: int = 128) -> Image.Image:
    """A face-like drawing with texture (square, like the fixture's astronaut crop): the engine crops and resizes it."""
    rng = np.random.default_rng(SEED)
    base = rng.integers(60, 200, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    s = size / 128
    draw.ellipse([28 * s, 16 * s, 100 * s, 116 * s], fill=(222, 184, 150))
    for x in (52, 76):
        draw.ellipse([(x - 6) * s, 44 * s, (x + 6) * s, 52 * s], fill=(40, 30, 30))
    draw.polygon([(64 * s, 56 * s), (58 * s, 74 * s), (70 * s, 74 * s)], fill=(190, 140, 120))
    draw.arc([52 * s, 84 * s, 76 * s, 98 * s], 20, 160, fill=(150, 40, 40), width=max(1, int(3 * s)))
    return image


def synthetic_voice(seconds: float = SPEECH_SECONDS, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic voiced signal: a gliding 110-160 Hz glottal pulse train through two moving formants, in
    syllables of about 0.2 s. Not speech, but it has speech's features a test relies on: a pitch, energy that comes
    and goes, and no two 40 ms frames alike (audio-pairing checks find each frame's own samples)."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 135 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    source = sum(np.sin(k * phase) / k for k in range(1, 25))
    formant1 = 1 + 0.8 * np.sin(2 * np.pi * (600 + 250 * np.sin(2 * np.pi * 1.9 * t)) * t)
    formant2 = 1 + 0.5 * np.sin(2 * np.pi * (1700 + 400 * np.sin(2 * np.pi * 1.3 * t)) * t)
    envelope = np.clip(np.sin(2 * np.pi * 2.4 * t) * 1.4 + 0.3, 0, 1) ** 2
    voice = source * formant1 * formant2 * envelope
    voice += np.random.default_rng(SEED).normal(0, 0.01, len(t))  # breath: silences are not exactly zero
    return (0.4 * voice / np.abs(voice).max()).astype(np.float32)


def espeak_voice(text: str, rate: int = SAMPLE_RATE, seconds: float = SPEECH_SECONDS) -> np.ndarray | None:
    """espeak-ng speech resampled to `rate` and cut/padded to `seconds`, or None without espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    wav = subprocess.run([exe, "--stdout", "-s", "170", text], check=True, capture_output=True, timeout=60).stdout
    import io

    with wave.open(io.BytesIO(wav)) as w:
        src_rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    from vexpress_rt.media import resample_pcm

    pcm = resample_pcm(pcm[None], src_rate, rate)[0]
    pcm = np.trim_zeros(np.where(np.abs(pcm) < 1e-4, 0, pcm))
    n = int(seconds * rate)
    return np.pad(pcm[:n], (0, max(0, n - len(pcm)))).astype(np.float32)


def write_wav(path: Path, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """16-bit mono WAV, written so that reading it back as int16 / 32768 gives `pcm` rounded to 16 bits."""
    data = np.clip(np.round(pcm * 32768), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def build_inputs(root: Path, speech: np.ndarray) -> Path:
    """The input files the CLI tests read, in the fixture set's formats: reference.png, reference_kps.npy, kps.pth
    (a list of numpy (3, 2) arrays, the original's format), kps_sequence.npy and audio.wav."""
    root.mkdir(parents=True)
    portrait_image().save(root / "reference.png")
    np.save(root / "reference_kps.npy", REFERENCE_KPS)
    frames = 30
    wobble = np.stack([np.sin(np.linspace(0, 2 * np.pi, frames)), np.cos(np.linspace(0, 2 * np.pi, frames))], 1)
    sequence = (REFERENCE_KPS[None, :3] + 2 * wobble[:, None, :]).astype(np.float32)
    np.save(root / "kps_sequence.npy", sequence)
    torch.save([s for s in sequence], root / "kps.pth")
    write_wav(root / "audio.wav", speech)
    write_video(root / "video.mp4", portrait_image())
    return root


def write_video(path: Path, image: Image.Image, frames: int = 10, fps: int = 25) -> Path:
    """A short silent mp4 of a still image (for the commands that take a driving video)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = image.width, image.height, "yuv420p"
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode(None))
    return path
