"""Limits on what a client may send or hold, each with a clear error (SECURITY.md lists them with their defaults).

| limit | setting | answer |
|---|---|---|
| upload (portrait, audio file) | `--max_upload_mb` 20 | 413 `payload_too_large` |
| portrait pixels, before decoding | `--max_image_pixels` 40 M | 413 `image_too_large` |
| SDP offer | `--max_sdp_bytes` 64 KiB | 413 `sdp_too_large` |
| JSON body | SDP limit + 16 KiB | 413 `payload_too_large` |
| websocket message | `--max_ws_message_bytes` 1 MiB | the socket closes with 1009 (message too big) |
| messages per websocket connection | `--max_ws_messages_per_s` 500/s | `error` event `rate_limited`; then 1008 |
| live control changes per session (PATCH, bot `control`) | `--max_control_changes_per_s` 10/s | 429 / `rate_limited` |
| pushed audio ahead of playback | `--max_buffer_s` 120 | 400 / `error` event `buffer_full` |
| audio format | 8-192 kHz, 1-8 channels (engine) | 400 |
| sessions per API key (else per client address) | `--max_sessions_per_key` = max_sessions | 429 `session_quota` |
| WHEP viewers per session | `--max_viewers` 4 | 429 `viewer_limit` |
| registered portraits | `--max_avatars` 16 | 409 `avatar_limit` |
| portraits being registered at once | 4 (1 running) | 503 + Retry-After |
| motion videos being extracted at once | 2 | 503 + Retry-After |
| motion video length | 30 s (`streaming.motion_video.MAX_VIDEO_S`) | 413 `payload_too_large` |
| motion video frames | 3840x2160 and `--max_image_pixels` (`MAX_VIDEO_PIXELS`) | 413 `image_too_large` |
| motion video analysis time | `--motion_video_budget_s` 180 | 413 `payload_too_large` |
| motion video codec | H.264, HEVC, VP8, VP9, AV1 (`VIDEO_CODECS`) | 415 |
| key-point file frames | 9000 (`streaming.engine.MAX_MOTION_FRAMES`), checked before any copy | 400 |

Session duration and idle time are enforced by `server/session/lifetime.py`.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Iterator

from aiohttp import BodyPartReader, web

from ..errors import ApiError

JSON_OVERHEAD_BYTES = 16 * 1024
MAX_PENDING_AVATARS = 4
MAX_PENDING_MOTION_VIDEOS = 2  # each is a face detection per frame, 0.15-0.4 s of a CPU core per frame
_READ_CHUNK = 64 * 1024
MESSAGE_BURST_S = 2.0  # a websocket may send this many seconds' worth of its message rate at once
MESSAGE_PATIENCE_S = 5.0  # ... and have a burst's worth dropped per this long before it is disconnected


def upload_bytes(config) -> int:
    return int(config.max_upload_mb * 2**20)


def json_bytes(config) -> int:
    return config.max_sdp_bytes + JSON_OVERHEAD_BYTES


def _too_large(what: str, limit: int, code: str = "payload_too_large") -> ApiError:
    size = f"{limit // 1024} KiB" if limit < 2**20 else f"{limit / 2**20:g} MiB"
    return ApiError(413, f"{what} is larger than {size}", code=code)


async def read_body(
    request: web.Request, limit: int, what: str = "the request body", code: str = "payload_too_large"
) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes: by its Content-Length when it has one,
    else while it streams in."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(what, limit, code)
    data = bytearray()
    while chunk := await request.content.read(_READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise _too_large(what, limit, code)
    return bytes(data)


async def form_parts(request: web.Request) -> AsyncIterator[BodyPartReader]:
    """The parts of a multipart/form-data body; a part that is itself multipart (nested) is a 400."""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "malformed multipart body: nested multipart parts are not accepted")
        yield part


def utf8(data: bytes, what: str, code: str = "bad_request") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", code=code) from exc


def check_sdp(sdp, limit: int) -> None:
    if isinstance(sdp, str) and len(sdp.encode("utf-8", "surrogatepass")) > limit:
        raise _too_large("the SDP", limit, "sdp_too_large")


def check_image_pixels(width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise ApiError(
            413,
            f"image: {width}x{height} is too large (at most {limit} pixels, --max_image_pixels)",
            code="image_too_large",
        )


def check_session_quota(state, owner: str | None) -> None:
    """Sessions one API key (or, without keys, one client address) holds at once."""
    limit = state.config.max_sessions_per_key or state.config.max_sessions
    if owner is None or limit >= state.config.max_sessions:
        return
    held = sum(1 for s in state.sessions if s.owner == owner)
    if held >= limit:
        state.sessions.refused_total += 1
        raise ApiError(
            429,
            f"this key already holds {held} sessions (at most {limit}, --max_sessions_per_key); end one first",
            code="session_quota",
            headers={"Retry-After": "5"},
        )


def check_viewers(session, limit: int, publisher: str) -> None:
    viewers = sum(1 for name in session.peers if name != publisher)
    if viewers >= limit:
        raise ApiError(
            429, f"this session has {viewers} viewers already (at most {limit}, --max_viewers)", code="viewer_limit"
        )


class Reservations:
    """Places counted against a limit from the moment a request is accepted, before its first await: concurrent
    requests cannot all pass a check of what exists and then all add one."""

    def __init__(self) -> None:
        self.pending = 0

    @contextlib.contextmanager
    def reserve(self, existing: int, limit: int) -> Iterator[None]:
        """One place, if `existing` plus those reserved stay under `limit` (read when used: a setting may change)."""
        if existing + self.pending >= limit:
            raise ApiError(
                409,
                f"{existing} portraits are registered and {self.pending} being registered (at most {limit}, "
                "--max_avatars); delete one first",
                code="avatar_limit",
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1


class PendingLimit:
    """At most `limit` operations in flight (e.g. portrait registrations queued for the model device); beyond,
    503 + Retry-After instead of an unbounded queue."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.count = limit, what, 0

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take a place (503 beyond); `release` gives it back. For work that may outlive the request awaiting it:
        the place is held until the work itself ends."""
        if self.count >= self.limit:
            raise ApiError(
                503,
                f"{self.count} {self.what} are in progress; try again later",
                code="busy",
                headers={"Retry-After": "5"},
            )
        self.count += 1

    def release(self) -> None:
        self.count -= 1


class RequestRate:
    """A token bucket for requests that change something (a session's live controls: PATCH and the bot's `control`
    message, `--max_control_changes_per_s`): `per_s` a second, in bursts of `MESSAGE_BURST_S` seconds' worth.
    `take()` answers 0 when the request may go on (it spends a token), else the seconds until one is back (the
    client's Retry-After); a refused request spends nothing. `refused` counts them. `clock` is injectable."""

    def __init__(self, per_s: float, what: str, clock: Callable[[], float] = time.monotonic):
        if not per_s > 0:
            raise ValueError(f"the rate must be positive, got {per_s}")
        self.per_s, self.what = float(per_s), what
        self.burst = max(1.0, self.per_s * MESSAGE_BURST_S)
        self.tokens = self.burst
        self.refused = 0
        self.clock = clock
        self._last = clock()

    def take(self) -> float:
        now = self.clock()
        elapsed, self._last = max(0.0, now - self._last), now
        self.tokens = min(self.burst, self.tokens + elapsed * self.per_s)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        self.refused += 1
        return (1.0 - self.tokens) / self.per_s

    def describe(self) -> str:
        return f"at most {self.per_s:g} {self.what} a second (bursts of {self.burst:g})"


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"  # over the rate: ignore the message (and tell the client)
    CLOSE = "close"  # it keeps flooding: hang up (1008)


class MessageRate:
    """The message rate limit of one websocket connection (`--max_ws_messages_per_s`): every message costs the
    event loop ~100 us before a handler even looks at it, so a connection gets a token bucket of `per_s` messages
    a second with bursts of `MESSAGE_BURST_S` seconds' worth. A message that finds the bucket empty is dropped
    (it spends nothing). Dropped messages draw on a second allowance of one burst, refilled over
    `MESSAGE_PATIENCE_S`: a client that sends a little too fast loses the excess, one that keeps flooding (about
    1.4x the rate or more, sustained) runs it dry within seconds and is disconnected, which is the only thing that
    stops the cost of reading its messages.

    `check()` runs on the event loop for each message; `clock` is injectable for tests."""

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic):
        if not per_s > 0:
            raise ValueError(f"the message rate must be positive, got {per_s}")
        self.per_s = float(per_s)
        self.burst = max(1.0, self.per_s * MESSAGE_BURST_S)
        self.tokens = self.burst
        self.strikes = self.burst  # drops still allowed before the connection is closed
        self.dropped = 0
        self.clock = clock
        self._last = clock()

    def check(self) -> Verdict:
        now = self.clock()
        elapsed, self._last = max(0.0, now - self._last), now
        self.tokens = min(self.burst, self.tokens + elapsed * self.per_s)
        self.strikes = min(self.burst, self.strikes + elapsed * self.burst / MESSAGE_PATIENCE_S)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return Verdict.ACCEPT
        self.dropped += 1
        self.strikes -= 1.0
        return Verdict.CLOSE if self.strikes < 0 else Verdict.DROP

    def describe(self) -> str:
        return f"at most {self.per_s:g} websocket messages a second (bursts of {self.burst:g}, --max_ws_messages_per_s)"
