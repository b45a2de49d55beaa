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
