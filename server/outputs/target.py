"""An output's destination and encoding settings, validated where they enter (the API body, `present --to`).

A URL is refused unless it is printable ASCII without spaces (no tab, newline or other control character that
FFmpeg or a log would read differently from Python), has no fragment, and, for SRT, only caller-side query keys
(no `mode=listener`/`rendezvous`, no local address or port: an output never makes the server listen). What is kept
is the URL rebuilt from its parsed parts (`url`), and that, never the text the client sent, is what the server
connects to. Where it may connect is server/access/outbound.py's call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from urllib.parse import parse_qsl, urlsplit

import av

from ..errors import ApiError

# the muxer each ingest protocol carries
MUXERS = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts"}
WHIP_SCHEMES = ("http", "https")
SCHEMES = (*MUXERS, *(f"whip+{s}" for s in WHIP_SCHEMES))
DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443, "http": 80, "https": 443}  # SRT has none: the URL names it
# SRT query keys a caller may set (FFmpeg's libsrt options); anything else, `mode` other than caller, `localip`,
# `localport`, `listen_timeout` among them, is refused
SRT_CALLER_KEYS = frozenset(
    {
        "streamid",
        "passphrase",
        "pbkeylen",
        "latency",
        "rcvlatency",
        "peerlatency",
        "maxbw",
        "inputbw",
        "oheadbw",
        "payload_size",
        "pkt_size",
        "connect_timeout",
        "tlpktdrop",
        "nakreport",
        "enforced_encryption",
        "transtype",
        "mode",
    }
)
FIELDS = {"url", "video_bitrate_kbps", "audio_bitrate_kbps", "keyframe_interval_s", "token", "tls_verify"}


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


DEFAULT_VIDEO_KBPS = 2500  # H.264 up to 1280x720's pixels (inside YouTube's and Twitch's 720p ranges) ...
DEFAULT_KBPS_PIXELS = 1280 * 720


def default_video_kbps(width: int, height: int) -> int:
    """The video bitrate when the caller names none: 2500 kbps up to 1280x720, above that growing with the pixels
    to the power 0.75 (bits per pixel fall as pictures grow), in 100 kbps steps: 1920x1080 (a framed presenter,
    docs/framing.md) gets 4600, inside the ingests' 1080p range."""
    ratio = width * height / DEFAULT_KBPS_PIXELS
    if ratio <= 1:
        return DEFAULT_VIDEO_KBPS
    return int(round(DEFAULT_VIDEO_KBPS * ratio**0.75 / 100) * 100)


@dataclass(frozen=True)
class OutputSettings:
    """Where to push and how. `url`: rtmp://, rtmps://, srt:// (an ingest) or http(s):// with `whip=True` (or a
    whip+http(s):// URL): a WHIP endpoint."""

    url: str
    whip: bool = False
    video_bitrate_kbps: int | None = None  # None: `default_video_kbps` of the session's frame size
    audio_bitrate_kbps: int = 128
    keyframe_interval_s: float = 2.0
    bearer_token: str | None = None  # WHIP: `Authorization: Bearer` for the endpoint
    tls_verify: bool = True  # rtmps:// and whip+https://: check the certificate and host name (opt out: tests)

    @property
    def kind(self) -> str:
        return "whip" if self.whip else urlsplit(self.url).scheme

    @property
    def muxer(self) -> str:
        return MUXERS[urlsplit(self.url).scheme]

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or DEFAULT_PORTS[parts.scheme]

    def tc_url(self) -> str:
        """RTMP's `tcUrl` as FFmpeg writes it for this URL (scheme, host, port), without the application path."""
        host = self.host
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    def encoder_url(self, relay_port: int | None = None, address: str | None = None) -> str:
        """The URL the encoder child opens: RTMP(S) through the server's relay on loopback (`relay_port`: the relay
        makes the connection, TLS included), SRT straight to the checked `address`."""
        parts = urlsplit(self.url)
        user = f"{parts.netloc.rpartition('@')[0]}@" if "@" in parts.netloc else ""
        query = f"?{parts.query}" if parts.query else ""
        if parts.scheme in ("rtmp", "rtmps"):
            return f"rtmp://{user}127.0.0.1:{relay_port}{parts.path}{query}"
        host = f"[{address}]" if address and ":" in address else address
        return f"{parts.scheme}://{user}{host}:{self.port}{parts.path}{query}"

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
        unknown = set(data) - FIELDS
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
        tls_verify = data.get("tls_verify", True)
        if not isinstance(tls_verify, bool):
            raise ApiError(400, "tls_verify must be true or false (false: accept any certificate, for test ingests)")
        return cls.parse(url, bearer_token=token, tls_verify=tls_verify, **numbers)

    @classmethod
    def parse(
        cls,
        url: str,
        video_bitrate_kbps: float | None = None,
        audio_bitrate_kbps: float = 128,
        keyframe_interval_s: float = 2.0,
        bearer_token: str | None = None,
        tls_verify: bool = True,
    ) -> OutputSettings:
        """`url` checked: printable ASCII, a known scheme, a host, a port, and a protocol this FFmpeg has (ApiError
        400 otherwise); kept as rebuilt from its parts."""
        if not all("!" <= c <= "~" for c in url):
            raise ApiError(
                400,
                "output URL: spaces, control characters and non-ASCII characters are refused "
                "(percent-encode them; write an international host name in its xn-- form)",
                code="invalid_url",
            )
        whip = url.startswith("whip+")
        plain = url[len("whip+") :] if whip else url
        parts = urlsplit(plain)
        try:
            port = parts.port
        except ValueError:
            raise ApiError(400, f"output URL {shown(url)!r}: the port is not a number from 0 to 65535") from None
        if parts.scheme not in (WHIP_SCHEMES if whip else MUXERS) or not parts.hostname:
            raise ApiError(
                400, f"output URL {shown(url)!r}: expected rtmp://, rtmps://, srt:// or whip+http(s)://, with a host"
            )
        if "#" in plain:
            raise ApiError(400, f"output URL {shown(url)!r}: a fragment (#) is refused", code="invalid_url")
        if port == 0 or (parts.scheme == "srt" and port is None):
            raise ApiError(400, f"output URL {shown(url)!r}: give the port (1 to 65535)", code="invalid_url")
        if parts.scheme == "srt":
            check_srt_query(parts.query)
        if not whip and not protocol_available(parts.scheme):
            raise ApiError(
                400,
                f"{parts.scheme}:// needs an FFmpeg built with it (PyAV's wheels have no libsrt); "
                "use rtmp:// or rtmps://, or install PyAV over an FFmpeg with libsrt",
                code="unsupported_protocol",
            )
        host = parts.hostname
        netloc = f"[{host}]" if ":" in host else host
        if "@" in parts.netloc:
            netloc = f"{parts.netloc.rpartition('@')[0]}@{netloc}"
        rebuilt = f"{parts.scheme}://{netloc}{f':{port}' if port else ''}{parts.path}"
        return cls(
            url=rebuilt + (f"?{parts.query}" if parts.query else ""),
            whip=whip,
            video_bitrate_kbps=None if video_bitrate_kbps is None else int(video_bitrate_kbps),
            audio_bitrate_kbps=int(audio_bitrate_kbps),
            keyframe_interval_s=float(keyframe_interval_s),
            bearer_token=bearer_token,
            tls_verify=tls_verify,
        )


def check_srt_query(query: str) -> None:
    """Only caller-side SRT options: nothing that makes the server listen or bind a chosen local address."""
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in SRT_CALLER_KEYS or (key == "mode" and value != "caller"):
            raise ApiError(
                400,
                f"srt:// query key {key[:40]!r} is refused: an output is an SRT caller (mode=caller); listener and "
                "rendezvous modes and local addresses or ports are not allowed",
                code="invalid_url",
            )


def shown(url: str) -> str:
    """A URL for an error message: scheme and host only (the rest may hold a stream key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/…"
