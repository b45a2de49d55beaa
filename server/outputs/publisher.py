"""What every output shares: its state machine, reconnection with back-off, and its figures.

```
connecting ──(first media out)──► live ──(ingest drops: write/connection error)──► reconnecting
     ▲                                                                                 │ back-off 1, 2, 4 … 60 s
     └─────────────────────────────────────────────────────────────────────────────────┘
any state ──(DELETE, the session ends)──► stopped
```
Back-off: each failure doubles the wait (1 s to 60 s), whether or not the connection went live meanwhile; only a
connection that stayed live for `STABLE_LIVE_S` starts again from 1 s. So an ingest that accepts and then drops
gets an encoder process every minute at most, not every second. Each connection checks the target again with the
outbound policy (server/access/outbound.py): a name that now resolves to a refused address is refused.

What reports and logs say of a failure is a fixed reason (`OutputFailure.reason`: "not allowed", "could not
connect", "http 403"...), never a remote reply, a socket's or FFmpeg's message: an output must not read back
what an internal service answers, nor tell open ports from closed ones.

A publisher reads the session's paired frames like any viewer: one bounded queue from the session's pump (`media.
MediaPump.subscribe`). A slow or dead ingest never stalls the session: the queue drops its oldest frames (counted)
and, while disconnected, the frames that pass are skipped (counted).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

from ..access.outbound import Endpoint, OutboundPolicy, OutboundRefused
from ..session.served import ServerSession
from .target import OutputSettings

BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 60.0
STABLE_LIVE_S = 30.0  # live this long: the next drop is a fresh start (back-off from 1 s)
BITRATE_WINDOW_S = 5.0
NOT_ALLOWED = "not allowed"


class OutputFailure(Exception):
    """A connection could not be made or ended; `reason` is fixed text, what the report's `last_error` shows."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def backoff_s(failures: int) -> float:
    """The wait before the next connection after `failures` failures in a row (0: after a stable connection)."""
    return min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** max(0, failures - 1))


@dataclass
class OutputFigures:
    frames_sent: int = 0
    frames_skipped: int = 0  # passed while disconnected
    bytes_sent: int = 0
    connects: int = 0  # times the output went live
    attempts: int = 0  # connection attempts
    encoder_starts: int = 0  # encoder child processes started (RTMP/SRT)
    reconnects: int = 0  # times it dropped and tried again


class Publisher:
    """Base of the ingest and WHIP publishers: `start()`, `stop()`, `report()`; subclasses write `_connect_and_run`
    (return or raise when the connection ends) and `media_seconds`."""

    kind = "output"

    def __init__(self, output_id: str, session: ServerSession, settings: OutputSettings, policy: OutboundPolicy):
        self.id = output_id
        self.session = session
        self.settings = settings
        self.policy = policy
        self.state = "connecting"
        self.last_error: str | None = None
        self.figures = OutputFigures()
        self.live_since: float | None = None
        self._bytes: collections.deque[tuple[float, int]] = collections.deque()
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = self.session.start_task(self._run(), f"output-{self.id}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.state = "stopped"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        failures = 0
        try:
            while not self._stopping and not self.session.closed:
                self.state = "connecting" if not self.figures.attempts else "reconnecting"
                self.figures.attempts += 1
                cause = "closed"
                try:
                    ended = await self._connect_and_run()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.last_error = failure_reason(exc)
                    cause = type(exc.__cause__ or exc).__name__  # the class only: its text may be the peer's
                    ended = False
                if ended or self._stopping or self.session.closed:
                    break
                stable = self.live_since is not None and time.monotonic() - self.live_since >= STABLE_LIVE_S
                failures = 0 if stable else failures + 1
                self.live_since = None
                self.figures.reconnects += 1
                self.state = "reconnecting"
                delay = backoff_s(failures)
                self.session.log.warning(
                    "%s output %s dropped (%s, %s): reconnecting in %.0f s",
                    self.kind,
                    self.id,
                    self.last_error,
                    cause,
                    delay,
                )
                await self._backoff(delay)
        finally:
            self.state = "stopped"
            self.live_since = None
            await self._cleanup()

    async def _endpoint(self) -> Endpoint:
        """The target checked again (each connection): the address to connect to."""
        try:
            return await self.policy.resolve(self.settings.host, self.settings.port)
        except OutboundRefused:
            raise OutputFailure(NOT_ALLOWED) from None

    async def _cleanup(self) -> None:
        """The publisher ended: release what it holds (subclasses)."""

    async def _connect_and_run(self) -> bool:
        """Connect, then send until the connection ends (raise) or the session's frames end (return True)."""
        raise NotImplementedError

    async def _backoff(self, delay: float) -> None:
        await asyncio.sleep(delay)

    def went_live(self) -> None:
        if self.live_since is None:
            self.live_since = time.monotonic()
            self.state = "live"
            self.figures.connects += 1
            self.session.log.info("%s output %s live: %s", self.kind, self.id, self.settings.shown_url())

    def count_bytes(self, total: int) -> None:
        """`total`: bytes sent over the whole output so far (all connections)."""
        now = time.monotonic()
        self.figures.bytes_sent = total
        self._bytes.append((now, total))
        while self._bytes and now - self._bytes[0][0] > BITRATE_WINDOW_S:
            self._bytes.popleft()

    @property
    def bitrate_bps(self) -> float:
        if self.state != "live" or len(self._bytes) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._bytes[0], self._bytes[-1]
        return 8.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def dropped_frames(self) -> int:
        return 0

    def report(self) -> dict:
        f = self.figures
        return {
            "id": self.id,
            "kind": self.kind,
            "url": self.settings.shown_url(),
            "state": self.state,
            "bitrate_kbps": round(self.bitrate_bps / 1000, 1),
            "live_s": round(time.monotonic() - self.live_since, 1) if self.live_since is not None else 0.0,
            "frames_sent": f.frames_sent,
            "frames_dropped": self.dropped_frames,
            "frames_skipped": f.frames_skipped,
            "bytes_sent": f.bytes_sent,
            "connects": f.connects,
            "reconnects": f.reconnects,
            "attempts": f.attempts,
            "encoder_starts": f.encoder_starts,
            "last_error": self.last_error,
        }


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, OutputFailure):
        return exc.reason
    if isinstance(exc, OutboundRefused):
        return NOT_ALLOWED
    return "failed"
