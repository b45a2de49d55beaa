"""Audio in, video out, with PyAV only (no ffmpeg binary, no torchaudio)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from vexpress_rt.errors import InputError

# Integer PCM formats and the divisor that maps them to [-1, 1) (torchaudio semantics: int16 / 32768).
_INT_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}
_OPUS_RATES = (48000, 24000, 16000, 12000, 8000)
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
# Encoder used when extracting audio into a file, by extension (what ffmpeg would pick by default).
_AUDIO_ENCODERS = {
    ".wav": "pcm_s16le",
    ".mp3": "libmp3lame",
    ".m4a": "aac",
    ".aac": "aac",
    ".mp4": "aac",
    ".ogg": "libopus",
    ".opus": "libopus",
    ".flac": "flac",
}
# Decoder name of the stream that an encoder's output can be remuxed from unchanged.
_REMUXABLE = {"pcm_s16le": "pcm_s16le", "libmp3lame": "mp3", "aac": "aac", "libopus": "opus", "flac": "flac"}


@dataclass
class DecodedAudio:
    """Decoded audio at the file's native rate; samples are float32 (channels, n)."""

    samples: np.ndarray
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def _layout_name(channels: int) -> str:
    if channels == 1:
        return "mono"
    if channels == 2:
        return "stereo"
    return f"{channels}c"  # FFmpeg's default layout for that many channels


def frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as float32 (channels, n); integer PCM divided by 2^(bits-1) like torchaudio."""
    fmt = frame.format
    channels = frame.layout.nb_channels
    arr = frame.to_ndarray()
    if not fmt.is_planar:  # packed: (1, n * channels), interleaved
        arr = arr.reshape(-1, channels).T
    name = fmt.name.rstrip("p")
    if name in _INT_SCALE:
        # int16 / 32768 is exact in float32; wider ints are rounded to float32 first, then scaled exactly.
        return arr.astype(np.float32) / np.float32(_INT_SCALE[name])
    if name == "u8":
        return (arr.astype(np.float32) - 128.0) / np.float32(128.0)
    return arr.astype(np.float32, copy=False)


def load_audio(path: str | Path) -> DecodedAudio:
    """Decode the first audio stream of any file PyAV reads, at its native rate and channel count."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file not found: {path}")
    chunks: list[np.ndarray] = []
    rate = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                data = frame_to_float(frame)
                if chunks and data.shape[0] != chunks[0].shape[0]:
                    raise InputError(f"{path}: the number of audio channels changes mid-stream")
                rate = rate or frame.sample_rate
                chunks.append(data)
            rate = rate or stream.rate or 0
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode audio file {path}: {exc}") from exc
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise InputError(f"{path} contains no audio samples")
    if rate <= 0:
        raise InputError(f"{path}: unknown audio sample rate")
    samples = np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype=np.float32)
    return DecodedAudio(samples=samples, sample_rate=int(rate))


class StreamResampler:
    """Incremental float32 (channels, n) resampler on PyAV's AudioResampler (libswresample).

    Push chunks as they arrive; call flush() at the end to get the samples held back by the filter, so that
    the total output is round(n * to_rate / from_rate) samples. Same rates pass chunks through exactly.
    """

    def __init__(self, channels: int, from_rate: int, to_rate: int) -> None:
        if channels < 1 or from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"bad resampler settings: channels={channels}, {from_rate} -> {to_rate} Hz")
        self.channels = channels
        self.from_rate = int(from_rate)
        self.to_rate = int(to_rate)
        self._layout = _layout_name(channels)
        self._passthrough = self.from_rate == self.to_rate
        self._resampler = (
            None if self._passthrough else av.AudioResampler(format="fltp", layout=self._layout, rate=self.to_rate)
        )
        self._flushed = False

    def _collect(self, frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.zeros((self.channels, 0), dtype=np.float32)
        out = np.concatenate([f.to_ndarray() for f in frames], axis=1)
        return np.ascontiguousarray(out, dtype=np.float32)

    def push(self, chunk: np.ndarray) -> np.ndarray:
        if self._flushed:
            raise RuntimeError("StreamResampler.push() after flush()")
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[0] != self.channels:
            raise ValueError(f"expected a ({self.channels}, n) chunk, got shape {chunk.shape}")
        if self._passthrough:
            return chunk.copy()
        if chunk.shape[1] == 0:
            return np.zeros((self.channels, 0), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self._layout)
        frame.sample_rate = self.from_rate
        assert self._resampler is not None
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        if self._flushed:
            return np.zeros((self.channels, 0), dtype=np.float32)
        self._flushed = True
        if self._resampler is None:
            return np.zeros((self.channels, 0), dtype=np.float32)
        return self._collect(self._resampler.resample(None))


def resample_pcm(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float32 (channels, n) in one shot (an exact copy when the rates match)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 2:
        raise ValueError(f"expected (channels, n) samples, got shape {samples.shape}")
    resampler = StreamResampler(samples.shape[0], from_rate, to_rate)
    head = resampler.push(samples)
    tail = resampler.flush()
    return np.concatenate([head, tail], axis=1)


def to_mono_16k(audio: DecodedAudio, rate: int = 16000) -> np.ndarray:
    """Mono float32 waveform at `rate`: resample (if needed), then average the channels, like the original.

    The original resamples with torchaudio's sinc resampler; libswresample is used here, so non-16 kHz inputs
    are not bit-identical to it (16 kHz inputs are: no resampling happens).
    """
    samples = audio.samples
    if audio.sample_rate != rate:
        samples = resample_pcm(samples, audio.sample_rate, rate)
    # torch's mean, as the original, so multi-channel sums round the same way.
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).mean(dim=0).numpy()


def _as_fraction(fps: Fraction | float | int) -> Fraction:
    if isinstance(fps, Fraction):
        rate = fps
    else:
        # e.g. L / D = 27.692307692307693 -> 360/13; keeps the container time base small and exact.
        rate = Fraction(fps).limit_denominator(100_000)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: Fraction | float,
    audio: DecodedAudio | None = None,
) -> None:
    """Write RGB uint8 frames (T, H, W, 3) as H.264 (libx264, yuv420p) with optional AAC audio.

    The frame rate may be fractional (the original writes at L / D); it is stored exactly as a Fraction. The
    audio is cut to the video's duration (like ffmpeg -shortest when the audio is longer). Odd frame sizes are
    padded by one replicated row / column, since yuv420p needs even sizes.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} {frames.shape}")
    write_video(path, iter(frames), len(frames), (frames.shape[2], frames.shape[1]), fps, audio)


# Video files that carry an alpha plane, by extension: (container format, video encoder, its pixel format, audio
# encoder). WebM: VP9 with alpha (what browsers and OBS's media source play as a cut-out). QuickTime: ProRes 4444
# with alpha and PCM audio (what video editors - Premiere, Resolve, Final Cut - import as a cut-out; large files).
ALPHA_FORMATS = {
    ".webm": ("webm", "libvpx-vp9", "yuva420p", "libopus"),
    ".mov": ("mov", "prores_ks", "yuva444p10le", "pcm_s16le"),
}


def write_video(
    path: str | Path,
    frames: Iterator[np.ndarray],
    num_frames: int,
    size: tuple[int, int],
    fps: Fraction | float,
    audio: DecodedAudio | None = None,
    alpha: bool = False,
) -> None:
    """Write `num_frames` uint8 frames of `size` (width, height), taken one at a time from `frames` (so that large
    frames need not all be held): RGB (H, W, 3) as H.264 with AAC audio (`write_mp4`), or, with `alpha`, RGBA
    (H, W, 4) as one of ALPHA_FORMATS, chosen by the path's extension (VP9 with alpha and Opus audio in WebM,
    ProRes 4444 with alpha and PCM audio in QuickTime).
    The audio is cut to the video's duration; odd sizes are padded by one replicated row / column."""
    if num_frames < 1:
        raise ValueError("no frames to write")
    rate = _as_fraction(fps)
    width, height = size
    pad_h, pad_w = height % 2, width % 2
    path = Path(path)
    channels = 4 if alpha else 3
    if alpha:
        if path.suffix.lower() not in ALPHA_FORMATS:
            raise InputError(f"{path.name}: a video with transparency must be one of {', '.join(ALPHA_FORMATS)}")
        container_format, video_codec, pix_fmt, audio_codec = ALPHA_FORMATS[path.suffix.lower()]
    else:
        container_format, video_codec, pix_fmt, audio_codec = None, "libx264", "yuv420p", "aac"
    path.parent.mkdir(parents=True, exist_ok=True)

    with av.open(str(path), mode="w", format=container_format) as container:
        vstream = container.add_stream(video_codec, rate=rate)
        vstream.width = width + pad_w
        vstream.height = height + pad_h
        vstream.pix_fmt = pix_fmt
        vstream.codec_context.time_base = 1 / rate
        if video_codec == "libvpx-vp9":
            # constant quality (the encoder's default is a low target bitrate), row threads, and the realtime
            # speed: measured at 1920x1080 (2 cores), 57 ms a frame against 228-278 for "good" at cpu-used 6-4,
            # for the same mean error (1.9 of 255)
            options = {"crf": "24", "b": "0", "row-mt": "1", "deadline": "realtime", "cpu-used": "8"}
            vstream.codec_context.options = options
        elif video_codec == "prores_ks":
            # ProRes 4444 (the profile with alpha), tagged as Apple's own encoder's so that Apple's decoders take it
            vstream.codec_context.options = {"profile": "4444", "vendor": "apl0"}

        astream = None
        pcm: np.ndarray | None = None
        if audio is not None and audio.num_samples > 0:
            pcm, audio_rate = _AUDIO_FOR[audio_codec](audio)
            # Cut to the video duration T / fps.
            keep = math.floor(Fraction(num_frames) / rate * audio_rate + Fraction(1, 2))
            pcm = pcm[:, :keep]
            astream = container.add_stream(audio_codec, rate=audio_rate)
            astream.layout = _layout_name(pcm.shape[0])

        for i in range(num_frames):
            image = next(frames)
            if image.dtype != np.uint8 or image.shape != (height, width, channels):
                expected = (height, width, channels)
                raise ValueError(f"frame {i}: expected uint8 {expected}, got {image.dtype} {image.shape}")
            if pad_h or pad_w:
                image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            vframe = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgba" if alpha else "rgb24")
            vframe.pts = i
            vframe.time_base = 1 / rate
            container.mux(vstream.encode(vframe))
        container.mux(vstream.encode(None))

        if astream is not None and pcm is not None and pcm.shape[1] > 0:
            block = 1024  # the AAC frame size (PyAV re-frames for Opus by itself)
            for start in range(0, pcm.shape[1], block):
                chunk = np.ascontiguousarray(pcm[:, start : start + block])
                aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=astream.layout.name)
                aframe.sample_rate = astream.rate
                aframe.pts = start
                aframe.time_base = Fraction(1, astream.rate)
                container.mux(astream.encode(aframe))
            container.mux(astream.encode(None))


def _audio_for_aac(audio: DecodedAudio) -> tuple[np.ndarray, int]:
    """Samples and rate AAC accepts: at most 2 channels (more are averaged to mono), a legal rate."""
    pcm = np.asarray(audio.samples, dtype=np.float32)
    if pcm.shape[0] > 2:
        pcm = pcm.mean(axis=0, keepdims=True)
    audio_rate = audio.sample_rate
    if audio_rate not in _AAC_RATES:
        target = min((r for r in _AAC_RATES if r >= audio_rate), default=96000)
        pcm = resample_pcm(pcm, audio_rate, target)
        audio_rate = target
    return pcm, audio_rate


def _audio_for_opus(audio: DecodedAudio) -> tuple[np.ndarray, int]:
    """Samples and rate Opus accepts: at most 2 channels (more are averaged to mono), 48 kHz (or a lower Opus rate
    the audio already has)."""
    pcm = np.asarray(audio.samples, dtype=np.float32)
    if pcm.shape[0] > 2:
        pcm = pcm.mean(axis=0, keepdims=True)
    if audio.sample_rate in _OPUS_RATES:
        return pcm, audio.sample_rate
    return resample_pcm(pcm, audio.sample_rate, 48000), 48000


def _audio_for_pcm(audio: DecodedAudio) -> tuple[np.ndarray, int]:
    """Samples and rate for PCM: at most 2 channels (more are averaged to mono), the audio's own rate."""
    pcm = np.asarray(audio.samples, dtype=np.float32)
    if pcm.shape[0] > 2:
        pcm = pcm.mean(axis=0, keepdims=True)
    return pcm, audio.sample_rate


_AUDIO_FOR = {"aac": _audio_for_aac, "libopus": _audio_for_opus, "pcm_s16le": _audio_for_pcm}


def read_video_frames(path: str | Path) -> tuple[np.ndarray, Fraction]:
    """Every frame of the first video stream as RGB uint8 (T, H, W, 3), and the stream's frame rate."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode video file {path}: {exc}") from exc
    if not frames:
        raise InputError(f"{path} contains no video frames")
    return np.stack(frames), Fraction(fps) if fps else Fraction(0)


def extract_audio(video_path: str | Path, audio_save_path: str | Path) -> None:
    """Write the first audio track of a media file to `audio_save_path`; the extension picks the format.

    Packets are copied unchanged when they are already in the target codec, otherwise the audio is re-encoded
    (WAV: 16-bit PCM, MP3, M4A/AAC, OGG/Opus, FLAC). Stands in for the original's `ffmpeg -i video -vn audio`.
    """
    src_path, dst_path = Path(video_path), Path(audio_save_path)
    codec = _AUDIO_ENCODERS.get(dst_path.suffix.lower())
    if codec is None:
        choices = ", ".join(sorted(_AUDIO_ENCODERS))
        raise InputError(f"unsupported audio output extension {dst_path.suffix!r}; use one of {choices}")
    if not src_path.is_file():
        raise InputError(f"video file not found: {src_path}")
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(str(src_path)) as src:
            if not src.streams.audio:
                raise InputError(f"{src_path} has no audio stream")
            in_stream = src.streams.audio[0]
            fmt = {".m4a": "ipod", ".aac": "adts", ".opus": "ogg"}.get(dst_path.suffix.lower())
            with av.open(str(dst_path), mode="w", format=fmt) as dst:
                if in_stream.codec_context.name == _REMUXABLE[codec]:
                    _remux_audio(src, in_stream, dst)
                else:
                    _reencode_audio(src, in_stream, dst, codec)
    except av.FFmpegError as exc:
        raise InputError(f"cannot extract audio from {src_path} to {dst_path}: {exc}") from exc


def _remux_audio(src: av.container.InputContainer, in_stream, dst: av.container.OutputContainer) -> None:
    out_stream = dst.add_stream_from_template(in_stream)
    for packet in src.demux(in_stream):
        if packet.dts is None:  # the demuxer's final empty packet
            continue
        packet.stream = out_stream
        dst.mux(packet)


def _reencode_audio(src: av.container.InputContainer, in_stream, dst: av.container.OutputContainer, codec: str) -> None:
    channels = min(in_stream.codec_context.channels or 2, 2)
    in_rate = in_stream.codec_context.sample_rate or in_stream.rate
    supported = av.Codec(codec, "w").audio_rates
    out_rate = in_rate
    if supported and in_rate not in supported:
        # ffmpeg picks the closest supported rate; prefer a higher one so nothing is lost.
        out_rate = min(supported, key=lambda r: (r < in_rate, abs(r - in_rate)))
    out_stream = dst.add_stream(codec, rate=out_rate)
    out_stream.layout = _layout_name(channels)
    # PyAV's encoder converts format / layout / rate and re-frames to the codec's frame size by itself.
    for frame in src.decode(in_stream):
        frame.pts = None
        dst.mux(out_stream.encode(frame))
    dst.mux(out_stream.encode(None))
