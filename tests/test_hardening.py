"""The holes of issue 12 ("Security and resource holes"), each shown closed: files on the server stay unread,
crop boxes stay bounded, deleted avatars are freed, failed peers leave nothing behind, the port answers at once,
and the limits that keep one client from taking the server hold.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from client_kit import mp3_bytes, pcm16, wav_bytes

from server.errors import ApiError
from server.speak import decode_audio_bytes


# -- 1. speak opens only allow-listed audio containers, from memory ------------------------------------------------
def _encoded(fmt: str, codec: str, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm16(1.0, rate), "<i2")[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


@pytest.fixture
def secret_wav(tmp_path, monkeypatch):
    """A WAV file beside the server's working directory that no client may have read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "secret.wav").write_bytes(wav_bytes(1.0))
    return "sub/secret.wav"


@pytest.mark.parametrize(
    "body",
    [
        "ffconcat version 1.0\nfile {path}\n",
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{path}\n#EXT-X-ENDLIST\n",
        "[playlist]\nFile1={path}\n",
        "file:{path}",
    ],
    ids=["ffconcat", "hls", "pls", "url"],
)
def test_speak_never_reads_a_file_named_by_the_body(secret_wav, body):
    with pytest.raises(ApiError) as err:
        decode_audio_bytes(body.format(path=secret_wav).encode(), max_seconds=5.0)
    assert err.value.status == 415, err.value


@pytest.mark.parametrize(
    "make",
    [
        lambda: wav_bytes(1.0),
        lambda: mp3_bytes(1.0),
        lambda: _encoded("ogg", "libopus", 48000),
        lambda: _encoded("flac", "flac"),
        lambda: _encoded("webm", "libopus", 48000),
        lambda: _encoded("ipod", "aac"),  # .m4a
        lambda: _encoded("adts", "aac"),
    ],
    ids=["wav", "mp3", "opus", "flac", "webm", "m4a", "aac"],
)
def test_speak_decodes_every_allowed_container(make):
    decoded = decode_audio_bytes(make(), max_seconds=5.0)
    assert 900 <= decoded.duration_ms <= 1200, decoded.duration_ms


def test_speak_refuses_images_and_text_with_415():
    from client_kit import image_bytes
    from PIL import Image

    for data in (image_bytes(Image.new("RGB", (64, 64)), "PNG"), b"hello world, not audio at all"):
        with pytest.raises(ApiError) as err:
            decode_audio_bytes(data, max_seconds=5.0)
        assert err.value.status == 415


# -- 2. the portrait crop stays bounded; key points that are no face are refused ------------------------------------
def test_the_issue_crop_bomb_is_refused_before_any_pixel_is_padded():
    """Eyes 1 px apart and a nose 999 px below them made a 6450x6450 padded copy (the issue's 40823x40823 at
    6324x6324): now an InputError (400), answered at once."""
    import time

    from PIL import Image

    from streaming.portrait import prepare_portrait
    from vexpress_rt.errors import InputError

    started = time.perf_counter()
    with pytest.raises(InputError, match="degenerate"):
        prepare_portrait(Image.new("RGB", (1000, 1000), "grey"), 128, 64, kps=[[0, 0], [1, 0], [0.5, 999]])
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "kps",
    [
        [[100, 100], [200, 100], [300, 100]],  # the nose on the eye line
        [[100, 100], [102, 100], [101, 102]],  # eyes 2 px apart
        [[100, 100], [140, 100], [120, 900]],  # a nose 35 eye distances below the eyes
        [[0, 0], [990, 0], [495, 560]],  # a face shape, but its crop is 16 times the photo
    ],
    ids=["collinear", "tiny-eyes", "far-nose", "crop-larger-than-photo"],
)
def test_key_points_that_are_no_face_in_the_photo_are_refused(kps):
    from PIL import Image

    from streaming.portrait import prepare_portrait
    from vexpress_rt.errors import InputError

    with pytest.raises(InputError):
        prepare_portrait(Image.new("RGB", (1000, 1000), "grey"), 128, 64, kps=kps)


def test_padding_a_face_in_a_corner_costs_the_crop_not_the_photo():
    """A face at the corner of a 2000x2000 photo: the crop (about 370 px) is padded, not the whole photo."""
    import tracemalloc

    from PIL import Image

    from streaming.portrait import prepare_portrait

    photo = Image.new("RGB", (2000, 2000), "grey")
    tracemalloc.start()
    try:
        crop, kps = prepare_portrait(photo, 128, 64, kps=[[10, 10], [110, 10], [60, 67]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert crop.size == (128, 64) and kps.shape == (3, 2)
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB (the photo alone is {3 * 2000 * 2000 / 2**20:.1f} MiB)"
