"""Push to an RTMP, RTMPS or SRT ingest (YouTube Live, Twitch, OBS, nginx-rtmp, MediaMTX...): H.264 + AAC, muxed
by PyAV (FLV for RTMP, MPEG-TS for SRT) with the recorder's writer (`mp4_writer.Mp4Writer`), so frame `i` and its
audio leave with the same timestamp, as in a recording.

Encoding runs in a child process per connection (encoder_process.py: PyAV holds the GIL while it connects), fed
from a thread of the output's own (never the event loop, never the model worker); each connection starts its
timestamps at 0 (an ingest takes a reconnect as a new stream). The connection itself is the server's: each attempt
resolves and checks the target (server/access/outbound.py); RTMP(S) goes through relay.py (connected, TLS verified,
before any child starts: a dead or refused target costs no process); SRT is opened by FFmpeg at the checked
address.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from aiortc.mediastreams import MediaStreamError

from streaming.frames import AVFrame

from ..access.outbound import OutboundPolicy
from ..session.served import ServerSession
from .encoder_process import EncoderProcess
from .mp4_writer import EncodeSpec
from .publisher import OutputFailure, Publisher
from .relay import IngestRelay, RelayError
from .target import OutputSettings, default_video_kbps

QUEUE_FRAMES = 50  # 2 s at 25 fps between the pump and the encoder
# no B-frames, no look-ahead (frames leave as they come); keyframes exactly every keyframe interval, as ingests
# (YouTube, Twitch) ask, not also at scene cuts
LIVE_X264 = {"preset": "veryfast", "tune": "zerolatency", "x264-params": "scenecut=0"}
NETWORK_TIMEOUT_S = 10.0
RELAY_DRAIN_S = 5.0  # after the encoder child closed: what it wrote last still reaches the ingest
# one reason for anything that fails before the first frames went out (refused, timed out, not an ingest, a
# handshake that failed), so that an output cannot tell an open port from a closed one
COULD_NOT_CONNECT = "could not connect"
DROPPED = "the connection dropped"


def encode_spec(settings: OutputSettings, fps: int, width: int, height: int) -> EncodeSpec:
    kbps = settings.video_bitrate_kbps or default_video_kbps(width, height)  # the frame size: framing can make 1080p
    return EncodeSpec(
        format=settings.muxer,
        video_options=dict(LIVE_X264),
        video_bit_rate=kbps * 1000,
        gop_frames=max(1, round(settings.keyframe_interval_s * fps)),
        audio_bit_rate=settings.audio_bitrate_kbps * 1000,
        timeout_s=NETWORK_TIMEOUT_S,
    )


def _close_quietly(writer: EncoderProcess) -> None:
    try:
        writer.close()
    except Exception:  # the connection is gone: nothing to flush to
        pass


class IngestPublisher(Publisher):
    def __init__(self, output_id: str, session: ServerSession, settings: OutputSettings, policy: OutboundPolicy):
        super().__init__(output_id, session, settings, policy)
        self.kind = settings.kind
        self.fps = session.engine_session.config.fps
        es = session.engine_session
        self.spec = encode_spec(settings, self.fps, es.width, es.height)
        self._queue = session.pump.subscribe(QUEUE_FRAMES)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"output-{output_id}")
        self._bytes_before = 0  # sent by earlier connections

    @property
    def dropped_frames(self) -> int:
        return self._queue.dropped

    async def _batch(self) -> list[AVFrame]:
        batch = [await self._queue.get()]
        while len(self._queue):
            batch.append(await self._queue.get())
        return batch

    async def _connect_and_run(self) -> bool:
        loop = asyncio.get_running_loop()
        endpoint = await self._endpoint()
        relay: IngestRelay | None = None
        relaying: asyncio.Future | None = None
        if self.settings.scheme in ("rtmp", "rtmps"):
            relay = IngestRelay(self.settings, endpoint)
            try:
                await relay.connect()
            except RelayError as exc:
                relay.close()
                raise OutputFailure(exc.reason) from None
            url = self.settings.encoder_url(relay_port=relay.port)
            relaying = asyncio.ensure_future(relay.run())
        else:
            url = self.settings.encoder_url(address=endpoint.address)
        writer: EncoderProcess | None = None
        try:
            # started off the loop (a fork of a big process); it connects with its first frame
            writer = await loop.run_in_executor(self._executor, EncoderProcess, url, self.fps, self.spec)
            self.figures.encoder_starts += 1
            while True:
                try:
                    batch = await self._batch()
                except MediaStreamError:
                    return True
                try:
                    await loop.run_in_executor(self._executor, writer.write, batch)
                except ConnectionError:
                    raise OutputFailure(DROPPED if self.live_since is not None else COULD_NOT_CONNECT) from None
                self.went_live()
                self.figures.frames_sent += len(batch)
                self.count_bytes(self._bytes_before + writer.bytes_out)
        finally:
            if writer is not None:
                self._bytes_before += writer.bytes_out
                await asyncio.shield(loop.run_in_executor(self._executor, _close_quietly, writer))
            if relay is not None and relaying is not None:
                # the child flushed its last frames and exited: let the relay pass them on before closing
                await asyncio.wait((relaying,), timeout=RELAY_DRAIN_S)
                relay.close()
                await asyncio.gather(relaying, return_exceptions=True)

    async def _backoff(self, delay: float) -> None:
        """Wait, skipping the frames that pass meanwhile (the queue stays fresh for the next connection)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
        while (left := end - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._queue.get(), left)
            except (asyncio.TimeoutError, MediaStreamError):  # waited enough, or the session ended
                return
            self.figures.frames_skipped += 1

    async def _cleanup(self) -> None:
        self.session.pump.unsubscribe(self._queue)
        self._executor.shutdown(wait=False)
