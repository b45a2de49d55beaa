"""An output's destination and encoding settings, validated where they enter (the API body, `present --to`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

import av

from ..errors import ApiError

# the muxer each ingest protocol carries
MUXERS = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts"}
WHIP_SCHEMES = ("http", "https")
SCHEMES = (*MUXERS, *(f"whip+{s}" for s in WHIP_SCHEMES))


@cache
def protocol_available(name: str) -> bool:
    """Whether the FFmpeg under PyAV has this network protocol (PyAV's wheels have no SRT: libsrt is not in them).
    Asked by opening an unreachable address: a missing protocol fails as ProtocolNotFoundError at once."""
    try:
        av.open(f"{name}://127.0.0.1:1", mode="r", timeout=0.5).close()
    except av.error.ProtocolNotFoundError:
        return False
    except Exception:
        return True
    return True


@dataclass(frozen=True)
class OutputSettings:
    """Where to push and how. `url`: rtmp://, rtmps://, srt:// (an ingest) or http(s):// with `whip=True` (or a
    whip+http(s):// URL): a WHIP endpoint."""

    url: str
    whip: bool = False
    video_bitrate_kbps: int = 2500
    audio_bitrate_kbps: int = 128
    keyframe_interval_s: float = 2.0
    bearer_token: str | None = None  # WHIP: `Authorization: Bearer` for the endpoint

    @property
    def kind(self) -> str:
        return "whip" if self.whip else urlsplit(self.url).scheme

    @property
    def muxer(self) -> str:
        return MUXERS[urlsplit(self.url).scheme]

    def shown_url(self) -> str:
        """The URL without its user info, query and the stream key part of the path: what reports may show."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        app = parts.path.rsplit("/", 1)[0] if parts.path.count("/") > 1 else parts.path
        return f"{'whip+' if self.whip else ''}{parts.scheme}://{host}{port}{app}/…"

    @classmethod
    def from_json(cls, data: object) -> OutputSettings:
        if not isinstance(data, dict):
            raise ApiError(400, "an output is a JSON object with a 'url'")
        unknown = set(data) - {"url", "video_bitrate_kbps", "audio_bitrate_kbps", "keyframe_interval_s", "token"}
        if unknown:
            raise ApiError(400, f"unknown output fields: {', '.join(sorted(unknown))}")
        url = data.get("url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "an output needs a 'url' (rtmp://, rtmps://, srt://, or whip+https:// for WHIP)")
        numbers = {}
        for key, low, high in (
            ("video_bitrate_kbps", 100, 50_000),
            ("audio_bitrate_kbps", 16, 512),
            ("keyframe_interval_s", 0.2, 10.0),
        ):
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ApiError(400, f"{key} must be a number from {low:g} to {high:g}")
            numbers[key] = value
        token = data.get("token")
        if token is not None and not isinstance(token, str):
            raise ApiError(400, "token must be a string (the WHIP endpoint's bearer token)")
        return cls.parse(url, bearer_token=token, **numbers)

    @classmethod
    def parse(
        cls,
        url: str,
        video_bitrate_kbps: float = 2500,
        audio_bitrate_kbps: float = 128,
        keyframe_interval_s: float = 2.0,
        bearer_token: str | None = None,
    ) -> OutputSettings:
        """`url` checked: a known scheme, a host, and a protocol this FFmpeg has (ApiError 400 otherwise)."""
        whip = url.startswith("whip+")
        plain = url[len("whip+") :] if whip else url
        parts = urlsplit(plain)
        if parts.scheme not in (WHIP_SCHEMES if whip else MUXERS) or not parts.hostname:
            raise ApiError(
                400, f"output URL {shown(url)!r}: expected rtmp://, rtmps://, srt:// or whip+http(s)://, with a host"
            )
        if not whip and not protocol_available(parts.scheme):
            raise ApiError(
                400,
                f"{parts.scheme}:// needs an FFmpeg built with it (PyAV's wheels have no libsrt); "
                "use rtmp:// or rtmps://, or install PyAV over an FFmpeg with libsrt",
                code="unsupported_protocol",
            )
        return cls(
            url=plain,
            whip=whip,
            video_bitrate_kbps=int(video_bitrate_kbps),
            audio_bitrate_kbps=int(audio_bitrate_kbps),
            keyframe_interval_s=float(keyframe_interval_s),
            bearer_token=bearer_token,
        )


def shown(url: str) -> str:
    """A URL for an error message: scheme and host only (the rest may hold a stream key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/…"
