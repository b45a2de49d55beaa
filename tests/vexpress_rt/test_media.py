"""Audio decoding / resampling and mp4 writing with PyAV."""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from vexpress_rt.errors import InputError
from vexpress_rt.media import (
    DecodedAudio,
    StreamResampler,
    extract_audio,
    load_audio,
    read_video_frames,
    resample_pcm,
    to_mono_16k,
    write_mp4,
    write_video,
)


def _sine(rate: int, channels: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    wave_ = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave_ * (0.8 + 0.2 * c) for c in range(channels)]).astype(np.float32)


def _write_audio(path: Path, samples: np.ndarray, rate: int, codec: str) -> None:
    """Encode float32 (channels, n) with PyAV; the encoder converts format / frame size itself."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        for start in range(0, samples.shape[1], 4096):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, start : start + 4096]), format="fltp", layout=layout
            )
            frame.sample_rate = rate
            frame.pts = None
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1.0 / rate)[np.argmax(spectrum)])


def test_fixture_wav_is_int16_over_32768(fixtures_dir: Path) -> None:
    path = fixtures_dir / "inputs" / "audio.wav"
    with wave.open(str(path)) as w:
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        rate = w.getframerate()
    audio = load_audio(path)
    assert audio.sample_rate == rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.shape == (1, 20800)
    np.testing.assert_array_equal(audio.samples[0], raw.astype(np.float32) / np.float32(32768))
    assert audio.duration == pytest.approx(1.3)
    # Already 16 kHz mono: values pass through untouched.
    mono = to_mono_16k(audio)
    assert mono.dtype == np.float32
    np.testing.assert_array_equal(mono, audio.samples[0])


@pytest.mark.parametrize(
    ("suffix", "codec", "rate", "channels"),
    [
        (".wav", "pcm_s16le", 44100, 2),
        (".ogg", "libopus", 48000, 2),
        (".mp3", "libmp3lame", 8000, 1),
        (".m4a", "aac", 22050, 1),
    ],
)
def test_decode_and_resample_keeps_length_and_pitch(
    tmp_path: Path, suffix: str, codec: str, rate: int, channels: int
) -> None:
    path = tmp_path / f"sine{suffix}"
    _write_audio(path, _sine(rate, channels, 1.0), rate, codec)
    audio = load_audio(path)
    assert audio.sample_rate == rate
    assert audio.channels == channels
    assert audio.num_samples == pytest.approx(rate, abs=0.1 * rate)  # codec delay / padding
    mono = to_mono_16k(audio)
    assert mono.ndim == 1 and mono.dtype == np.float32
    expected = round(audio.num_samples * 16000 / rate)
    assert abs(len(mono) - expected) <= 2
    assert _peak_hz(mono, 16000) == pytest.approx(440.0, abs=3.0)


def test_wav_int16_decodes_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32767, size=(1000, 2), dtype=np.int16)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(pcm.tobytes())
    audio = load_audio(path)
    np.testing.assert_array_equal(audio.samples, pcm.T.astype(np.float32) / 32768)


def test_stream_resampler_matches_one_shot_length() -> None:
    x = _sine(44100, 2, 0.5)
    one_shot = resample_pcm(x, 44100, 16000)
    assert abs(one_shot.shape[1] - round(x.shape[1] * 16000 / 44100)) <= 2
    resampler = StreamResampler(2, 44100, 16000)
    parts = [resampler.push(x[:, i : i + 777]) for i in range(0, x.shape[1], 777)] + [resampler.flush()]
    streamed = np.concatenate(parts, axis=1)
    assert streamed.shape == one_shot.shape
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)
    # Same rate: exact pass-through.
    np.testing.assert_array_equal(resample_pcm(x, 16000, 16000), x)


def test_corrupt_or_missing_audio_is_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(InputError):
        load_audio(bad)
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    with pytest.raises(InputError):
        load_audio(empty)


def test_video_without_audio_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    write_mp4(path, np.zeros((2, 16, 16, 3), np.uint8), 25, None)
    with pytest.raises(InputError, match="no audio stream"):
        load_audio(path)


def test_write_mp4_fractional_fps_with_audio(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(10, 64, 128, 3), dtype=np.uint8)
    fps = Fraction(36 * 16000, 20800)
    audio = DecodedAudio(samples=_sine(16000, 1, 1.3), sample_rate=16000)  # longer than the video
    path = tmp_path / "nested" / "out.mp4"
    write_mp4(path, frames, fps, audio)
    assert path.is_file()

    with av.open(str(path)) as container:
        vstream = container.streams.video[0]
        astream = container.streams.audio[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(vstream)]
        assert vstream.codec_context.name == "h264"
        assert astream.codec_context.name == "aac"
        assert float(vstream.average_rate) == pytest.approx(27.6923, abs=1e-3)
        video_seconds = float(vstream.duration * vstream.time_base)
        audio_seconds = float(astream.duration * astream.time_base)
    assert len(decoded) == 10
    assert decoded[0].shape == (64, 128, 3)
    assert video_seconds == pytest.approx(10 / float(fps), abs=0.01)
    assert audio_seconds == pytest.approx(video_seconds, abs=0.07)  # cut to the video, within one AAC frame

    back, back_fps = read_video_frames(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert back_fps == Fraction(360, 13)
    # Lossy, but close on average.
    assert np.abs(back.astype(float) - frames.astype(float)).mean() < 60


def test_write_mp4_odd_size_and_float_fps(tmp_path: Path) -> None:
    frames = np.full((3, 31, 45, 3), 128, np.uint8)
    path = tmp_path / "odd.mp4"
    write_mp4(path, frames, 360 / 13, None)
    back, fps = read_video_frames(path)
    assert back.shape == (3, 32, 46, 3)  # padded to even by replication
    assert fps == Fraction(360, 13)
    assert np.abs(back.astype(int) - 128).max() <= 3


def test_extract_audio_remux_and_reencode(tmp_path: Path) -> None:
    video = tmp_path / "talk.mp4"
    audio = DecodedAudio(samples=_sine(16000, 1, 1.0), sample_rate=16000)
    write_mp4(video, np.zeros((25, 16, 16, 3), np.uint8), 25, audio)
    for suffix in (".m4a", ".wav", ".mp3"):
        out = tmp_path / f"extracted{suffix}"
        extract_audio(video, out)
        got = load_audio(out)
        assert got.sample_rate == 16000
        assert got.duration == pytest.approx(1.0, abs=0.1)
        assert _peak_hz(to_mono_16k(got), 16000) == pytest.approx(440.0, abs=3.0)
    with pytest.raises(InputError, match="extension"):
        extract_audio(video, tmp_path / "x.xyz")


@pytest.mark.parametrize(
    "suffix, video_codec, audio_codec", [(".webm", "vp9", "opus"), (".mov", "prores", "pcm_s16le")]
)
def test_a_video_with_transparency_keeps_its_alpha_and_its_speech(tmp_path: Path, suffix, video_codec, audio_codec):
    """A cut-out for a browser or OBS (.webm: VP9 with alpha) or for a video editor (.mov: ProRes 4444): the alpha
    plane read back is the one written, and the speech goes with it."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 48, 64, 4), dtype=np.uint8)
    frames[..., 3] = 0
    frames[:, 12:36, 16:48, 3] = 255  # the person: opaque; the rest: transparent
    speech = DecodedAudio(np.sin(np.arange(9600) / 8.0).astype(np.float32)[None] * 0.3, 48000)
    path = tmp_path / f"cutout{suffix}"
    write_video(path, iter(frames), len(frames), (64, 48), 25, speech, alpha=True)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == video_codec
        assert [s.codec_context.name for s in container.streams.audio] == [audio_codec]
        # FFmpeg's own VP9 decoder drops the alpha plane: libvpx's reads it
        decoder = av.CodecContext.create("libvpx-vp9", "r") if video_codec == "vp9" else stream.codec_context
        decoded = [f.to_ndarray(format="rgba") for p in container.demux(stream) for f in decoder.decode(p)]
    alpha = np.stack(decoded)[..., 3].astype(np.int16)
    assert alpha.shape == frames[..., 3].shape
    assert np.abs(alpha - frames[..., 3]).max() <= 2


def test_a_video_with_transparency_needs_a_format_that_carries_it(tmp_path: Path) -> None:
    frames = np.zeros((2, 16, 16, 4), np.uint8)
    with pytest.raises(InputError, match=r"cutout.mp4: a video with transparency must be one of \.webm, \.mov"):
        write_video(tmp_path / "cutout.mp4", iter(frames), 2, (16, 16), 25, alpha=True)
