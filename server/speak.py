"""`POST /v1/sessions/{id}/speak`: an audio file (WAV, MP3, OGG/Opus, FLAC, WebM, M4A, AAC: see `sniff`, at any
rate and channel count) queued for the avatar to say as one utterance.

The body is the file itself (`Content-Type: audio/*` or `application/octet-stream`) or a multipart form with the
file in the field `audio`. Replies: 202 `{"utterance_ms", "sample_rate", "channels", "buffered_ms"}`; 400 for a
body that is not a readable audio file; 413 beyond `--max_upload_mb` or longer than the session's audio buffer;
415 for another content type, a container outside the allow-list (playlists, concat, images...) or a
file without an audio stream; 409 when the session's buffer has no room for it.

Decoding (bounded by the duration limit while it runs, so a small file cannot expand without end) and pushing run
in a thread; the audio is pushed in 1 s pieces so the session's lock is never held for long. Whatever the session
was given before (an open websocket utterance included) is ended first: the file is an utterance of its own.
"""

from __future__ import annotations

import asyncio
import io

import av
import numpy as np
from aiohttp import web

from streaming.audio_input import MAX_CHANNELS, MAX_RATE
from vexpress_rt.errors import InputError

from .errors import ApiError
from .limits import form_parts
from .sniff import audio_demuxer
from .state import server_state, session_for

MAX_SPEAK_BYTES = 25 * 2**20  # unless the server sets --max_upload_mb
RAW_TYPES = ("application/octet-stream", "application/ogg")
PUSH_PIECE_S = 1.0


class DecodedFile:
    def __init__(self, samples: np.ndarray, sample_rate: int):
        self.samples = samples  # float32 (n, channels)
        self.sample_rate = sample_rate

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.samples) / self.sample_rate


def decode_audio_bytes(data: bytes, max_seconds: float) -> DecodedFile:
    """The first audio stream of an in-memory file, at its own rate and channel count (float32, interleaved)."""
    chunks: list[np.ndarray] = []
    total = 0
    rate = channels = 0
    try:
        with av.open(io.BytesIO(data), mode="r", format=audio_demuxer(data)) as container:
            if not container.streams.audio:
                raise ApiError(415, "the file has no audio stream", code="unsupported_media_type")
            stream = container.streams.audio[0]
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:
                    rate, channels = frame.sample_rate, frame.layout.nb_channels
                    if not 8000 <= rate <= MAX_RATE or not 1 <= channels <= MAX_CHANNELS:
                        raise ApiError(
                            415,
                            f"unsupported audio: {rate} Hz, {channels} channels (8000-{MAX_RATE} Hz, "
                            f"1-{MAX_CHANNELS} channels)",
                            code="unsupported_media_type",
                        )
                    resampler = av.AudioResampler(format="flt", layout=frame.layout.name, rate=rate)
                elif (frame.sample_rate, frame.layout.nb_channels) != (rate, channels):
                    raise ApiError(400, "the audio format changes mid-file", code="invalid_audio")
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1, channels))
                    total += len(chunks[-1])
                if total > max_seconds * rate:
                    raise ApiError(413, f"the audio is longer than {max_seconds:g} s", code="payload_too_large")
            if resampler is not None:
                chunks += [out.to_ndarray().reshape(-1, channels) for out in resampler.resample(None)]
    except av.FFmpegError as exc:
        raise ApiError(400, f"not a readable audio file (WAV, MP3, OGG...): {exc}", code="invalid_audio") from exc
    samples = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    if len(samples) == 0:
        raise ApiError(400, "the file holds no audio samples", code="invalid_audio")
    return DecodedFile(np.ascontiguousarray(samples, dtype=np.float32), rate)


async def _read_limited(read, limit: int) -> bytes:
    data = bytearray()
    while chunk := await read(1 << 16):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the audio file is larger than {limit / 2**20:g} MiB", code="payload_too_large")
    return bytes(data)


async def read_audio_body(request: web.Request, limit: int = MAX_SPEAK_BYTES) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the audio file is larger than {limit / 2**20:g} MiB", code="payload_too_large")
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        try:
            async for part in form_parts(request):
                if part.name == "audio":
                    return await _read_limited(part.read_chunk, limit)
        except (ValueError, AssertionError) as exc:
            raise ApiError(400, f"malformed multipart body: {exc}") from exc
        raise ApiError(400, "the form needs an 'audio' file")
    if ctype.startswith(("audio/", "video/")) or ctype in RAW_TYPES:
        return await _read_limited(request.content.read, limit)
    raise ApiError(
        415,
        f"send the audio file as the body (Content-Type audio/*, e.g. audio/wav, audio/mpeg, audio/ogg) or as the "
        f"multipart field 'audio', not {ctype or 'no content type'}",
    )


def _push(session, decoded: DecodedFile) -> None:
    """One utterance of its own (any open one is ended first), in pieces."""
    session.end_utterance()
    piece = max(1, int(PUSH_PIECE_S * decoded.sample_rate))
    for start in range(0, len(decoded.samples), piece):
        session.push_audio(decoded.samples[start : start + piece], decoded.sample_rate, decoded.channels)
    session.end_utterance()


async def speak(request: web.Request) -> web.Response:
    session = session_for(request)
    es = session.engine_session
    limit = int(server_state(request).config.max_upload_mb * 2**20)
    data = await read_audio_body(request, limit)
    if not data:
        raise ApiError(400, "the body is empty: send an audio file", code="invalid_audio")
    loop = asyncio.get_running_loop()
    max_s = es.config.max_buffer_s
    decoded = await loop.run_in_executor(None, decode_audio_bytes, data, max_s)
    room_ms = 1000 * max_s - es.buffered_ms
    if decoded.duration_ms > room_ms:
        raise ApiError(
            409,
            f"the session's audio buffer has room for {room_ms / 1000:.1f} s, the file lasts "
            f"{decoded.duration_ms / 1000:.1f} s; try again after playback",
            code="buffer_full",
        )
    try:
        await loop.run_in_executor(None, _push, es, decoded)
    except InputError as exc:
        if "buffer full" in str(exc):
            raise ApiError(409, str(exc), code="buffer_full") from exc
        raise
    session.connected_once.set()
    session.pump.start()  # the audio plays (and its events come) with or without a viewer
    session.log.info(
        "speak: %.2f s of audio (%d Hz, %d ch)", decoded.duration_ms / 1000, decoded.sample_rate, decoded.channels
    )
    return web.json_response(
        {
            "utterance_ms": round(decoded.duration_ms, 1),
            "sample_rate": decoded.sample_rate,
            "channels": decoded.channels,
            "buffered_ms": round(es.buffered_ms, 1),
        },
        status=202,
    )
