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

from aiohttp import web

from vexpress_rt.errors import InputError

from ..access.limits import PendingLimit, form_parts
from ..errors import ApiError
from ..media.audio_file import ByteBudget, DecodedFile, decode_off_loop
from .state import STATE, server_state, session_for

MAX_SPEAK_BYTES = 25 * 2**20  # unless the server sets --max_upload_mb
RAW_TYPES = ("application/octet-stream", "application/ogg")
PUSH_PIECE_S = 1.0


class AudioDecoding:
    """The server's decoded-audio budget (`--decoded_audio_mb`, shared with scripts) and the `/speak` requests
    reading or decoding a file at once (`--max_speak_decodes`, 503 + Retry-After beyond)."""

    def __init__(self, budget_mb: float, speak_decodes: int):
        self.budget = ByteBudget(int(budget_mb * 2**20), "server's decoded-audio", "decoded_audio_mb")
        self.speaking = PendingLimit(speak_decodes, "audio files being read for /speak (--max_speak_decodes)")


AUDIO_DECODING = web.AppKey("audio_decoding", AudioDecoding)


def setup(app: web.Application) -> None:
    config = app[STATE].config
    app[AUDIO_DECODING] = AudioDecoding(config.decoded_audio_mb, config.max_speak_decodes)


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
    decoding = request.app[AUDIO_DECODING]
    with decoding.speaking:  # taken before the body is read: the upload is held in memory too
        data = await read_audio_body(request, limit)
        if not data:
            raise ApiError(400, "the body is empty: send an audio file", code="invalid_audio")
        max_s, rate = es.config.max_buffer_s, es.config.output_sample_rate
        decoded = await decode_off_loop(data, max_s, rate, decoding.budget)
    del data
    loop = asyncio.get_running_loop()
    try:
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
    finally:
        decoded.release()  # the session holds what was pushed (at most --max_buffer_s)
    session.connected_once.set()
    session.pump.start()  # the audio plays (and its events come) with or without a viewer
    seconds, source = decoded.duration_ms / 1000, (decoded.source_rate, decoded.source_channels)
    session.log.info("speak: %.2f s of audio (%d Hz, %d ch)", seconds, *source)
    return web.json_response(
        {
            "utterance_ms": round(decoded.duration_ms, 1),
            "sample_rate": decoded.source_rate,  # the file's own format
            "channels": decoded.source_channels,
            "buffered_ms": round(es.buffered_ms, 1),
        },
        status=202,
    )
