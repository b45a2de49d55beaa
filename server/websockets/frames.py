"""Frames without WebRTC, `GET /v1/sessions/{id}/frames`: every frame of the session as one binary message,
a fixed header + JPEG (WebP with alpha for a transparent background) + the frame's PCM16 audio (schema:
docs/websocket.md), for consumers that composite the
avatar themselves (OBS browser sources, game engines).

The socket is one more subscriber of the session's pacing task: a bounded queue (`?queue=`, default 12 frames)
that drops its oldest frame when the consumer falls behind (counted in `vexpress_dropped_frames_total{stage=
"track_queue"}`), so a slow consumer loses frames and never stalls the session or other viewers. The socket's own
buffers are kept small (64 KiB in the writer, 128 KiB asked of the kernel) so that what a slow consumer gets next is
recent, not seconds old. JPEG encoding runs in a small thread pool, off the event loop. Nothing is expected from
the client; what it sends anyway is ignored, within the per-connection message rate (`--max_ws_messages_per_s`):
beyond, an `error` event `rate_limited`, and a client that keeps flooding is disconnected (1008).
"""

from __future__ import annotations

import asyncio
import io
import socket

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from aiortc.mediastreams import MediaStreamError
from PIL import Image

from streaming.frames import AVFrame
from vexpress_rt_client import wire
from vexpress_rt_client.frames import FLAG_ALPHA, FLAG_SPEAKING, HEADER, MAGIC, VERSION, parse_frame  # noqa: F401  (parse_frame: re-exported)

from ..access.limits import Verdict
from ..api.state import server_state, session_for
from ..errors import ApiError
from .sockets import ENCODER_POOL, MessageLimit, SessionSockets, Tracked

DEFAULT_QUEUE_FRAMES = 12
MAX_QUEUE_FRAMES = 250
MAX_CLIENT_MESSAGE_BYTES = 1 << 16  # nothing is expected from the client: a larger message closes the socket (1009)
WRITE_BUFFER = 1 << 16  # the websocket writer's buffer, and
SEND_BUFFER = 1 << 17  # the kernel's send buffer (fixed: no autotuning up to megabytes of stale frames)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(out, "JPEG", quality=int(quality))
    return out.getvalue()


def encode_webp_alpha(image: np.ndarray, alpha: np.ndarray, quality: int) -> bytes:
    """RGB lossy at `quality`, the alpha plane lossless (WebP's default): at 1280x720 ~60 KB where PNG takes
    ~1.4 MB, and browsers decode it natively (docs/websocket.md)."""
    out = io.BytesIO()
    rgba = np.dstack([image, alpha])
    Image.fromarray(rgba, "RGBA").save(out, "WEBP", quality=int(quality), method=0)
    return out.getvalue()


def pack_frame(frame: AVFrame, quality: int) -> bytes:
    """One frame as a message: header, JPEG (WebP with alpha when the frame has an alpha plane), PCM16 LE mono."""
    has_alpha = frame.alpha is not None
    if frame.alpha is not None:
        jpeg = encode_webp_alpha(frame.image, frame.alpha, quality)
    else:
        jpeg = encode_jpeg(frame.image, quality)
    audio = np.asarray(frame.audio, dtype="<i2").tobytes()
    height, width = frame.image.shape[:2]
    pts_us = frame.index * frame.time_base.numerator * 1_000_000 // frame.time_base.denominator
    header = HEADER.pack(
        MAGIC,
        VERSION,
        (FLAG_SPEAKING if frame.speaking else 0) | (FLAG_ALPHA if has_alpha else 0),
        HEADER.size,
        frame.index,
        pts_us,
        frame.sample_rate,
        len(frame.audio),
        len(jpeg),
        width,
        height,
        frame.utterance or 0,
    )
    return header + jpeg + audio


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {value!r}")
    return number


def _limit_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except (OSError, AttributeError):
            pass


async def frames_socket(request: web.Request) -> web.WebSocketResponse:
    session = session_for(request)  # 404 / 401 before the upgrade
    config = server_state(request).config
    quality = _int_query(request, "quality", config.jpeg_quality, 1, 95)
    queue_frames = _int_query(request, "queue", DEFAULT_QUEUE_FRAMES, 1, MAX_QUEUE_FRAMES)
    # A small write buffer: frames a consumer cannot take wait in the bounded queue (and the oldest are dropped)
    # instead of piling up in socket buffers as latency.
    with SessionSockets(request, session, "frames", config.max_frames_sockets):  # 429 beyond, before upgrading
        ws = web.WebSocketResponse(
            compress=False, max_msg_size=MAX_CLIENT_MESSAGE_BYTES, heartbeat=20.0, writer_limit=WRITE_BUFFER
        )
        await ws.prepare(request)
        _limit_send_buffer(request)
        es = session.engine_session
        pool = request.app[ENCODER_POOL]
        loop = asyncio.get_running_loop()
        session.connected_once.set()
        queue = session.pump.subscribe(queue_frames)
        rate = MessageLimit(request, "frames", config.max_ws_messages_per_s)

        async def read_client() -> None:  # nothing is expected from the client; this notices it leaving
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    continue
                verdict, error = rate.check()
                if error is not None:
                    await ws.send_json(error)
                if verdict is Verdict.CLOSE:
                    session.log.warning("frames websocket closed: message rate limit (%d dropped)", rate.dropped)
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"message rate limit")
                    break

        reader = loop.create_task(read_client(), name=f"frames-read-{session.id}")
        sent = 0
        async with Tracked(request.app, ws):
            try:
                await ws.send_json(
                    {
                        "type": wire.STREAM_START,
                        "session_id": session.id,
                        "fps": es.config.fps,
                        "width": es.width,
                        "height": es.height,
                        "sample_rate": es.config.output_sample_rate,
                        "channels": 1,
                        "jpeg_quality": quality,
                        "alpha": es.config.background == "transparent",  # frames are WebP with alpha
                        "header_bytes": HEADER.size,
                        "version": VERSION,
                    }
                )
                while not reader.done():
                    get = loop.create_task(queue.get())
                    done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if get not in done:
                        get.cancel()
                        break
                    frame = get.result()  # MediaStreamError once the session has ended
                    data = await loop.run_in_executor(pool, pack_frame, frame, quality)
                    await ws.send_bytes(data)
                    sent += 1
            except MediaStreamError:
                await ws.close(code=WSCloseCode.OK, message=b"session closed")
            except (ConnectionError, RuntimeError):
                pass  # the client went away mid-send
            finally:
                session.pump.unsubscribe(queue)
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await ws.close()
        session.log.info("frames websocket closed after %d frames (%d dropped)", sent, queue.dropped)
        return ws
