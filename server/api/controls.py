"""Live controls over HTTP: `PATCH /v1/sessions/{id}`, `GET /v1/styles`, `POST/GET /v1/motions`,
`DELETE /v1/motions/{id}`.

A control change (from PATCH or the bot websocket's `control` message) names live fields of `GenerationParams`
(`streaming.controls.LIVE_FIELDS`) and/or a `style`, whose fields come first and the request's own over them.
It takes effect on the next frame made, ramped; the session's `control.applied` event names the frame it shows
on. Motions are key-point sequences (`extract-kps` output, kps.pth or .npy, or extracted here from a short video)
a session's `motion` names by id. Uploads are parsed off the event loop: a key-point file with every size checked
against the file before any copy (`vexpress_rt.kps.parse_kps_sequence`), a video in a worker thread within a pixel
cap, a codec allow-list and a time budget, stopped when its client leaves (`streaming.motion_video`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
from dataclasses import asdict

import numpy as np
from aiohttp import web

from streaming.controls import LIVE_FIELDS
from streaming.engine import MAX_MOTION_FRAMES
from streaming.motion_video import (
    MAX_VIDEO_S,
    UnsupportedCodec,
    VideoOverBudget,
    VideoTooLarge,
    VideoTooLong,
    motion_from_video,
)
from streaming.session import StreamSession
from streaming.styles import STYLE_FIELDS
from vexpress_rt.errors import InputError, WeightsError
from vexpress_rt.kps import parse_kps_sequence
from vexpress_rt.params import shown

from ..access import limits
from ..access.auth import require_api_key
from ..access.sniff import VIDEO_CONTAINERS, video_demuxer
from ..errors import ApiError
from ..session.served import ServerSession
from .state import ServerState, json_body, server_state, session_for

CONTROL_FIELDS = frozenset({*LIVE_FIELDS, "style"})
CLIENT_CHECK_S = 0.2  # how often a motion video's extraction looks whether its client is still there

log = logging.getLogger(__name__)


def control_changes(state: ServerState, data: object) -> dict:
    """The fields a control request changes: its style's, then its own (InputError: unknown fields)."""
    if not isinstance(data, dict) or not data:
        raise InputError(f"send a JSON object with some of: {', '.join(sorted(CONTROL_FIELDS))}")
    if "preset" in data:  # steps, new frames and lookahead fix the session's denoiser and audio features
        raise InputError("a preset is chosen when the session opens (POST /v1/sessions); it cannot change live")
    unknown = set(data) - CONTROL_FIELDS
    if unknown:
        live = ", ".join(sorted(CONTROL_FIELDS))
        raise InputError(f"cannot change {shown_names(unknown)} during a session; live: {live}")
    changes: dict = {}
    style = data.get("style")
    if style is not None:
        if not isinstance(style, str) or style not in state.styles:
            raise InputError(f"style must be one of {', '.join(state.styles)}, got {shown(style)}")
        changes.update(state.styles[style])
    changes.update({k: v for k, v in data.items() if k != "style" and v is not None})
    return changes


def shown_names(names: set[str], most: int = 5) -> str:
    """Field names a client sent, as an error message may echo them: a few, each cut (`shown`)."""
    listed = [shown(n) if len(n) > 40 else n for n in sorted(names)[:most]]
    return ", ".join(listed) + (f" and {len(names) - most} more" if len(names) > most else "")


def control_rate_refusal(state: ServerState, session: ServerSession, via: str) -> tuple[str, float] | None:
    """None when `session`'s live controls may change now (a token of `--max_control_changes_per_s` spent), else
    the refusal's message and the seconds until a change may go on; counted in `/metrics`
    (`vexpress_control_changes_limited_total{via}`) and logged at the 1st, 2nd, 4th, 8th... refusal: a flood costs
    a few log lines, not one per request."""
    rate = session.control_rate
    wait_s = rate.take()
    if not wait_s:
        return None
    state.metrics.control_changes_limited.labels(via=via).inc()
    if rate.refused & (rate.refused - 1) == 0:
        session.log.info("control changes over the rate: %d refused so far (%s)", rate.refused, rate.describe())
    return f"{rate.describe()} per session (--max_control_changes_per_s); try again in {wait_s:.2f} s", wait_s


def apply_control(state: ServerState, session: StreamSession, data: object) -> dict:
    """Change `session`'s controls (InputError: a bad value, nothing changed); the reply both transports send."""
    change = session.change_controls(control_changes(state, data))
    return {"version": change.version, "params": asdict(change.params)}


async def patch_session(request: web.Request) -> web.Response:
    session = session_for(request)
    state = server_state(request)
    refusal = control_rate_refusal(state, session, "patch")  # before the body is read: a refusal costs nothing
    if refusal is not None:
        message, wait_s = refusal
        raise ApiError(429, message, code="rate_limited", headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
    data = await json_body(request)
    try:
        reply = apply_control(state, session.engine_session, data)
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    session.log.debug("controls changed (version %s): %s", reply["version"], shown_names(set(data)))
    return web.json_response({"id": session.id, **reply})


async def list_styles(request: web.Request) -> web.Response:
    state = server_state(request)
    return web.json_response({"fields": list(STYLE_FIELDS), "styles": state.styles})


MOTION_FIELDS = ("motion", "file")  # a multipart upload's file field
KPS_FILE_MAGIC = (b"PK\x03\x04", b"\x80", b"\x93NUMPY")  # torch.save (zip; legacy pickle), numpy .npy


async def create_motion(request: web.Request) -> web.Response:
    """The body: a kps.pth (the original's format), a .npy (N, 3, 2) of pixel key points, or a short video
    (MP4/MOV/WebM/MKV, at most MAX_VIDEO_S) whose face's key points are extracted here."""
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    data = await _motion_upload(request, limits.upload_bytes(state.config))
    demuxer = video_demuxer(data)
    if demuxer is not None:
        sequence = await _video_sequence(request, state, data, demuxer)
    else:
        sequence = await _kps_file_sequence(data)
    try:
        motion_id = state.engine.add_motion(sequence[:, :3])
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    return web.json_response({"id": motion_id, "frames": len(sequence)}, status=201)


async def _motion_upload(request: web.Request, limit: int) -> bytes:
    """The raw body, or the file of a multipart form (`curl -F motion=@clip.mp4`): its field `motion` (or `file`)."""
    if not request.content_type.startswith("multipart/"):
        return await limits.read_body(request, limit, "the motion file")
    try:
        async for part in limits.form_parts(request):
            if part.name in MOTION_FIELDS:
                data = bytearray()
                while chunk := await part.read_chunk():
                    data += chunk
                    if len(data) > limit:
                        raise ApiError(
                            413, f"the motion file is larger than {limit / 2**20:g} MiB", code="payload_too_large"
                        )
                return bytes(data)
    except (ValueError, AssertionError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from exc
    raise ApiError(400, f"the form needs a file in the field {' or '.join(repr(f) for f in MOTION_FIELDS)}")


async def _kps_file_sequence(data: bytes) -> np.ndarray:
    if not data.startswith(KPS_FILE_MAGIC):  # neither torch.save's zip or pickle nor .npy: say what is accepted
        raise ApiError(
            400, f"the motion file is not a kps.pth (torch.save), a .npy of key points or a video ({VIDEO_CONTAINERS})"
        )
    # Off the loop: a valid file of the largest size takes a while to unpickle and copy.
    loop = asyncio.get_running_loop()
    parse = functools.partial(parse_kps_sequence, data, "the upload", MAX_MOTION_FRAMES)
    try:
        return await loop.run_in_executor(None, parse)  # weights_only, numpy allow-list: no code runs
    except InputError as exc:
        raise ApiError(400, f"{exc}; or a video ({VIDEO_CONTAINERS})") from None


async def _video_sequence(request: web.Request, state: ServerState, data: bytes, demuxer: str) -> np.ndarray:
    """Decoding and a face detection per frame take seconds: a worker thread (the default pool, not the model
    device's executor), so the loop keeps serving sessions. Its place among the extractions at once (503 beyond:
    each holds a CPU core) is held until the thread ends, and the thread stops at its next frame when the client
    leaves or this request is cancelled."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    extract = functools.partial(
        motion_from_video,
        data,
        demuxer,
        state.config.max_image_pixels,
        state.engine.config.insightface_root,
        MAX_VIDEO_S,
        state.config.motion_video_budget_s,
        stop,
    )
    state.motion_videos.acquire()
    try:
        extraction = loop.run_in_executor(None, extract)
    except BaseException:
        state.motion_videos.release()
        raise
    extraction.add_done_callback(functools.partial(_extraction_ended, state))
    try:
        return await _unless_client_leaves(request, extraction, stop)
    except VideoTooLong as exc:
        raise ApiError(413, str(exc), code="payload_too_large") from None
    except VideoOverBudget as exc:
        raise ApiError(413, f"video: {exc}", code="payload_too_large") from None
    except VideoTooLarge as exc:
        raise ApiError(413, str(exc), code="image_too_large") from None
    except UnsupportedCodec as exc:
        raise ApiError(415, str(exc)) from None
    except InputError as exc:
        raise ApiError(400, f"video: {exc}") from None
    except WeightsError as exc:
        raise ApiError(503, f"no face detector available: {exc}", code="unavailable") from None
    finally:
        stop.set()  # done, failed, cancelled or the client left: a running extraction ends at its next frame


async def _unless_client_leaves(request: web.Request, extraction: asyncio.Future, stop: threading.Event) -> np.ndarray:
    # asyncio.wait, not await: cancelling this request must not mark the extraction done while its thread runs.
    while not (await asyncio.wait({extraction}, timeout=CLIENT_CHECK_S))[0]:
        transport = request.transport
        if transport is None or transport.is_closing():
            stop.set()
            log.info("motion video: the client left; its extraction stops at the next frame")
            # What aiohttp raises in a handler whose client has gone: no response, no error logged.
            raise asyncio.CancelledError
    return extraction.result()


def _extraction_ended(state: ServerState, extraction: asyncio.Future) -> None:
    state.motion_videos.release()
    if not extraction.cancelled():
        # Retrieved here: a request whose client left never reads it (ExtractionStopped), and asyncio would log it.
        extraction.exception()


async def delete_motion(request: web.Request) -> web.Response:
    """Forget an uploaded motion. Sessions following it keep their copy until they change `motion`; new sessions
    and control changes can no longer name it (400 "no motion")."""
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    motion_id = request.match_info["motion_id"]
    if not state.engine.remove_motion(motion_id):
        raise ApiError(404, "no such motion")
    return web.Response(status=204)


async def list_motions(request: web.Request) -> web.Response:
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    return web.json_response({"motions": state.engine.motions()})
