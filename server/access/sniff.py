"""Which decoder may read an upload, decided from its first bytes against an allow-list.

FFmpeg probes every demuxer it has when none is named: a few bytes of text become an `ffconcat` or HLS playlist
that opens files (or URLs) on the server, an image sequence, a device. So uploads never reach the probe: the
container is identified here from its magic bytes and named to `av.open`, which then runs that demuxer only, on
the in-memory file only. Anything else is refused (415).
"""

from __future__ import annotations

from ..errors import ApiError

AUDIO_CONTAINERS = "WAV, MP3, OGG/Opus, FLAC, WebM/Matroska, M4A/MP4, AAC (ADTS)"


def audio_demuxer(data: bytes) -> str:
    """The FFmpeg demuxer for an uploaded audio file, from its magic bytes; ApiError 415 when not allowed."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if head[4:8] == b"ftyp":  # ISO base media: M4A, MP4 (external data references stay off: enable_drefs=0)
        return "mov"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an MPEG audio frame sync
        return "aac" if head[1] & 0x06 == 0 else "mp3"  # layer bits 00: ADTS AAC; else MPEG layer I-III
    raise ApiError(
        415, f"not an accepted audio container (accepted: {AUDIO_CONTAINERS})", code="unsupported_media_type"
    )


VIDEO_CONTAINERS = "MP4, MOV, WebM, MKV"
_QUICKTIME_ATOMS = (b"ftyp", b"moov", b"wide", b"free", b"mdat")  # what an ISO/QuickTime file starts with


def video_demuxer(data: bytes) -> str | None:
    """The FFmpeg demuxer for an uploaded video (MP4/MOV: "mov", WebM/MKV: "matroska"), or None when the first
    bytes are neither (the caller decides what else the upload may be)."""
    head = data[:16]
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if head[4:8] in _QUICKTIME_ATOMS:  # external data references stay off (enable_drefs=0, FFmpeg's default)
        return "mov"
    return None
