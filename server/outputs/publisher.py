"""What every output shares: its state machine, reconnection with back-off, and its figures.

```
connecting ──(first media out)──► live ──(ingest drops: write/connection error)──► reconnecting
     ▲                                                                                 │ back-off 1, 2, 4 … 30 s
     └─────────────────────────────────────────────────────────────────────────────────┘
any state ──(DELETE, the session ends)──► stopped
```
A publisher reads the session's paired frames like any viewer: one bounded queue from the session's pump (`media.
MediaPump.subscribe`). A slow or dead ingest never stalls the session: the queue drops its oldest frames (counted)
and, while disconnected, the frames that pass are skipped (counted).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

from ..sessions import ServerSession
from .target import OutputSettings

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
BITRATE_WINDOW_S = 5.0


@dataclass
class OutputFigures:
    frames_sent: int = 0
    frames_skipped: int = 0  # passed while disconnected
    bytes_sent: int = 0
    connects: int = 0  # times the output went live
    attempts: int = 0  # connection attempts
    reconnects: int = 0  # times it dropped and tried again


class Publisher:
    """Base of the ingest and WHIP publishers: `start()`, `stop()`, `report()`; subclasses write `_connect_and_run`
    (return or raise when the connection ends) and `media_seconds`."""

    kind = "output"

    def __init__(self, output_id: str, session: ServerSession, settings: OutputSettings):
        self.id = output_id
        self.session = session
        self.settings = settings
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
                try:
                    ended = await self._connect_and_run()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # FFmpeg's messages name the URL: never show its stream key
                    text = str(exc).replace(self.settings.url, self.settings.shown_url())
                    self.last_error = f"{type(exc).__name__}: {text}"[:300]
                    ended = False
                if ended or self._stopping or self.session.closed:
                    break
                failures = 0 if self.live_since is not None else failures + 1
                self.live_since = None
                self.figures.reconnects += 1
                self.state = "reconnecting"
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                self.session.log.warning(
                    "%s output %s dropped (%s): reconnecting in %.0f s", self.kind, self.id, self.last_error, delay
                )
                await self._backoff(delay)
        finally:
            self.state = "stopped"
            self.live_since = None
            await self._cleanup()

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
            "last_error": self.last_error,
        }
