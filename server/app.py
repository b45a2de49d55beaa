"""The HTTP API: `create_app(config, engine)` builds the aiohttp application; handlers only adapt HTTP to the engine.

| method, path | auth | what |
|---|---|---|
| GET / (and the page's files) | - | the browser page (`web_client/`) |
| GET /healthz, /readyz, /metrics, /v1/info | - | liveness; 503 + Retry-After at capacity; Prometheus; settings |
| POST /v1/avatars, GET /v1/avatars, GET/DELETE /v1/avatars/{id} | key | portraits (pre-encoded on upload) |
| POST /v1/sessions | key | a session: id, token and its URLs |
| GET/DELETE /v1/sessions/{id}, POST .../offer, .../interrupt | token | the session, its WebRTC publisher |
| POST /v1/sessions/{id}/whep, DELETE .../whep/{viewer} | token | WHEP viewers of the same session |
| POST /offer | key | aiortc-example compatible: a session on the default avatar, answered at once |

"key": the API key when the server has one (else open); "token": the session's token or the API key.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web
from aiortc import RTCPeerConnection
from PIL import Image

from streaming.engine import CapacityError
from streaming.session import SessionConfig
from vexpress_rt.errors import InputError

from . import lifetime, limits, metrics, rtc, security
from .auth import client_identity, has_api_key, new_token, require_api_key, require_session_token
from .config import ServerConfig
from .errors import ApiError, error_middleware
from .media import AvatarAudioTrack, AvatarVideoTrack, MediaPump
from .sessions import PUBLISHER, ServerSession, SessionLog, SessionRegistry

log = logging.getLogger("server")

VERSION = "0.1.0"
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # decoders an upload may reach
RETRY_AFTER_S = 5
GIL_SWITCH_INTERVAL_S = 0.001
SESSION_FIELDS = {
    "avatar_id",
    "fps",
    "steps",
    "guidance_scale",
    "reference_attention_weight",
    "audio_attention_weight",
    "decoder",
    "audio",
}


@dataclass
class ServerState:
    config: ServerConfig
    engine: object
    owns_engine: bool
    sessions: SessionRegistry = field(default_factory=SessionRegistry)
    default_avatar_id: str | None = None  # None while the default portrait is being registered
    startup_task: asyncio.Task | None = None
    startup_error: str | None = None  # why the default portrait could not be registered
    avatar_jobs: limits.PendingLimit = field(
        default_factory=lambda: limits.PendingLimit(limits.MAX_PENDING_AVATARS, "portrait registrations")
    )
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar")
    )
    sockets_refused: dict[str, int] = field(default_factory=dict)  # websockets refused at a per-session limit
    avatar_places: limits.Reservations = field(default=None)  # registrations in flight, counted against max_avatars

    def __post_init__(self):
        if self.avatar_places is None:
            self.avatar_places = limits.Reservations(self.config.max_avatars)

    def engine_stats(self) -> dict:
        try:
            return dict(self.engine.stats())
        except Exception:
            log.exception("engine.stats() failed")
            return {}

    def avatar_count(self) -> int:
        return len(self.engine.avatars())

    def session_config(self, **overrides) -> SessionConfig:
        values = {
            "fps": self.config.fps,
            "steps": self.config.steps,
            "max_buffer_s": self.config.max_buffer_s,
            "decoder": self.engine.config.default_session.decoder,  # --decoder, resolved when the engine loaded
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SessionConfig(**values)

    def at_capacity(self, session_config: SessionConfig | None = None) -> bool:
        if len(self.sessions) >= self.config.max_sessions:
            return True
        return not self.engine.can_admit(session_config or self.session_config())


STATE = web.AppKey("state", ServerState)


def _state(request: web.Request) -> ServerState:
    return request.app[STATE]


def _capacity_error(reason: str = "the server is at capacity", retry_after: float = RETRY_AFTER_S) -> ApiError:
    headers = {"Retry-After": str(max(1, round(retry_after)))}
    return ApiError(503, f"{reason}; try again later", code="capacity", headers=headers)


async def _json_body(request: web.Request, allow_empty: bool = False) -> dict:
    data = await limits.read_body(request, limits.json_bytes(_state(request).config), "the JSON body")
    text = limits.utf8(data, "the JSON body", code="invalid_json")
    if not text.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "a JSON body is required", code="invalid_json")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON: {str(exc)[:200]}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return data


# -- basic endpoints ----------------------------------------------------------------------------------------------
async def index(request: web.Request) -> web.StreamResponse:
    page = Path(_state(request).config.web_root) / "index.html"
    if not page.is_file():
        raise ApiError(404, f"the browser page is not installed ({page} is missing)")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def page_file(request: web.Request) -> web.StreamResponse:
    """The page's other files (scripts, styles), from the web root only."""
    root = Path(_state(request).config.web_root).resolve()
    path = (root / request.match_info["path"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(404, f"not found: /{request.match_info['path']}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = _state(request)
    body = {"sessions": len(state.sessions), "max_sessions": state.config.max_sessions}
    if state.startup_error is not None:
        return web.json_response({"status": "failed", "error": state.startup_error, **body}, status=503)
    if state.default_avatar_id is None:
        return web.json_response(
            {"status": "starting", **body}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    if not state.engine.warm:
        return web.json_response({"status": "warming", **body}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    if state.at_capacity():
        return web.json_response({"status": "full", **body}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return web.json_response({"status": "ready", **body})


async def metrics_endpoint(request: web.Request) -> web.Response:
    text = metrics.render(metrics.collect(_state(request)))
    return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


def _avatar_json(info, default_id: str | None) -> dict:
    return {
        "id": info.id,
        "name": info.name,
        "width": info.width,
        "height": info.height,
        "created": info.created,
        "kps": getattr(info, "kps", None),
        "default": info.id == default_id,
    }


def _may_control(request: web.Request, config: ServerConfig) -> bool:
    """Open server, or the request carries an API key."""
    return config.api_key is None or has_api_key(request, config.api_key)


async def info(request: web.Request) -> web.Response:
    state = _state(request)
    cfg = state.config
    control = _may_control(request, cfg)  # what only a key holder may see: the model's folder, the avatars
    model = {"name": "V-Express", "device": str(state.engine.models.device)}  # the device in use, not the flag
    if control:
        model["model_dir"] = str(cfg.model_dir)
    avatars = [_avatar_json(a, state.default_avatar_id) for a in state.engine.avatars()] if control else None
    return web.json_response(
        {
            "version": VERSION,
            "model": model,
            "width": cfg.width,
            "height": cfg.height,
            "fps": cfg.fps,
            "steps": cfg.steps,
            "decoder": state.engine.config.default_session.decoder,
            "decoders": list(state.engine.decoders),
            "max_sessions": cfg.max_sessions,
            "sessions": len(state.sessions),
            "codecs": {"video": ["VP8", "H264"], "audio": ["opus"]},
            "audio_out": {"sample_rate": 48000, "channels": 1, "packet_ms": 20},
            # TURN credentials only to callers who may open sessions (they get them with the session anyway)
            "ice_servers": [s.to_json(with_credentials=control) for s in cfg.ice_server],
            "auth": {"api_key": cfg.api_key is not None},
            "default_avatar_id": state.default_avatar_id,
            **({"avatars": avatars} if control else {}),
            "mark_frames": cfg.mark_frames,
        }
    )


# -- avatars ------------------------------------------------------------------------------------------------------
def parse_kps(text: str) -> np.ndarray:
    """`[[x, y], ...]` (3 or 5 points) or `{"kps": [...]}`, pixels of the uploaded image."""
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data["kps"]
        kps = np.asarray(data, dtype=np.float32)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise ApiError(400, f'kps: expected JSON [[x, y], ...] or {{"kps": ...}} ({str(exc)[:200]})') from exc
    if kps.shape not in ((3, 2), (5, 2)) or not np.isfinite(kps).all():
        raise ApiError(400, f"kps: expected 3 or 5 finite [x, y] points, got shape {kps.shape}")
    return kps[:3]


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A portrait from uploaded bytes (PNG, JPEG, WebP, GIF, BMP). Its size is checked from the header, before any
    pixel is decoded (decompression bombs: 413); unreadable, truncated or corrupt data is a 400."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image: {exc}", code="image_too_large") from exc
    except Exception as exc:  # UnidentifiedImageError, and whatever a broken header raises
        raise ApiError(400, f"image: not a readable {'/'.join(IMAGE_FORMATS)} picture ({exc})") from exc
    limits.check_image_pixels(image.width, image.height, max_pixels)
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data: OSError, SyntaxError, EOFError, struct.error...
        raise ApiError(400, f"image: cannot decode the picture ({type(exc).__name__}: {exc})") from exc


async def create_avatar(request: web.Request) -> web.Response:
    state = _state(request)
    require_api_key(request, state.config.api_key)
    if not request.content_type.startswith("multipart/"):
        raise ApiError(415, "send multipart/form-data with an 'image' file (and optional 'kps', 'name')")
    with state.avatar_places.reserve(len(state.engine.avatars())):  # 409 beyond --max_avatars, reserved first
        return await _register_avatar(request, state)


async def _register_avatar(request: web.Request, state: ServerState) -> web.Response:
    max_upload = limits.upload_bytes(state.config)
    fields: dict[str, bytes] = {}
    total = 0
    try:
        reader = await request.multipart()
        async for part in reader:
            data = bytearray()
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > max_upload:
                    raise ApiError(413, f"the upload is larger than {state.config.max_upload_mb:g} MiB")
                data += chunk
            if part.name in ("image", "kps", "name"):
                fields[part.name] = bytes(data)
    except (ValueError, AssertionError, TypeError, UnicodeError) as exc:
        raise ApiError(400, f"malformed multipart body: {str(exc)[:200]}") from exc
    if not fields.get("image"):
        raise ApiError(400, "the form needs an 'image' file")
    kps = parse_kps(fields["kps"].decode("utf-8", "replace")) if fields.get("kps") else None
    name = fields["name"].decode("utf-8", "replace")[:200] if fields.get("name") else None
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    with state.avatar_jobs:  # a bounded queue in front of the device (decoding included): 503 beyond
        # Decoding a 40 MP picture takes most of a second: in a thread, never on the loop that paces every session.
        image = await loop.run_in_executor(None, decode_image, fields["image"], state.config.max_image_pixels)
        avatar = await loop.run_in_executor(state.executor, lambda: state.engine.add_avatar(image, kps, name))
    log.info("avatar %s registered in %.2f s", avatar.id, time.perf_counter() - started)
    body = _avatar_json(avatar, state.default_avatar_id)
    return web.json_response(body, status=201, headers={"Location": f"/v1/avatars/{avatar.id}"})


async def list_avatars(request: web.Request) -> web.Response:
    state = _state(request)
    require_api_key(request, state.config.api_key)
    return web.json_response({"avatars": [_avatar_json(a, state.default_avatar_id) for a in state.engine.avatars()]})


def _avatar_or_404(state: ServerState, avatar_id: str):
    avatar = state.engine.get_avatar(avatar_id)
    if avatar is None:
        raise ApiError(404, f"no avatar {avatar_id!r}")
    return avatar


async def get_avatar(request: web.Request) -> web.Response:
    state = _state(request)
    require_api_key(request, state.config.api_key)
    avatar = _avatar_or_404(state, request.match_info["avatar_id"])
    return web.json_response(_avatar_json(avatar, state.default_avatar_id))


async def delete_avatar(request: web.Request) -> web.Response:
    state = _state(request)
    require_api_key(request, state.config.api_key)
    avatar_id = request.match_info["avatar_id"]
    _avatar_or_404(state, avatar_id)
    if avatar_id == state.default_avatar_id:
        raise ApiError(409, "the default avatar cannot be deleted")
    state.engine.remove_avatar(avatar_id)
    return web.Response(status=204)


# -- sessions -----------------------------------------------------------------------------------------------------
def _session_config_from_json(state: ServerState, data: dict) -> tuple[str, SessionConfig]:
    unknown = set(data) - SESSION_FIELDS
    if unknown:
        raise ApiError(400, f"unknown fields: {', '.join(sorted(unknown))}")
    avatar_id = data.get("avatar_id") or state.default_avatar_id
    if avatar_id is None:
        raise _capacity_error("the server is starting (the default portrait is being encoded)")
    if not isinstance(avatar_id, str):
        raise ApiError(400, "avatar_id must be a string")
    audio = data.get("audio") or {}
    if not isinstance(audio, dict) or set(audio) - {"sample_rate", "channels"}:
        raise ApiError(400, 'audio must be an object {"sample_rate", "channels"}')
    values = {
        "fps": data.get("fps"),
        "steps": data.get("steps"),
        "guidance_scale": data.get("guidance_scale"),
        "reference_attention_weight": data.get("reference_attention_weight"),
        "audio_attention_weight": data.get("audio_attention_weight"),
        "decoder": data.get("decoder"),
        "input_sample_rate": audio.get("sample_rate"),
        "input_channels": audio.get("channels"),
    }
    for key in ("fps", "steps", "input_sample_rate", "input_channels"):
        if values[key] is not None and (not isinstance(values[key], int) or isinstance(values[key], bool)):
            raise ApiError(400, f"{key} must be an integer")
    for key in ("guidance_scale", "reference_attention_weight", "audio_attention_weight"):
        if values[key] is not None and (not isinstance(values[key], (int, float)) or isinstance(values[key], bool)):
            raise ApiError(400, f"{key} must be a number")
    if values["decoder"] is not None and not isinstance(values["decoder"], str):
        raise ApiError(400, "decoder must be a string")
    config = state.session_config(**values)
    config.validate()  # InputError -> 400
    return avatar_id, config


async def _open_session(
    state: ServerState, avatar_id: str, config: SessionConfig, owner: str | None = None
) -> ServerSession:
    """`owner`: who the session counts against (--max_sessions_per_key)."""
    if state.engine.get_avatar(avatar_id) is None:
        raise ApiError(404, f"no avatar {avatar_id!r}")
    limits.check_session_quota(state, owner)
    if len(state.sessions) >= state.config.max_sessions:
        state.sessions.refused_total += 1
        raise _capacity_error(f"all {state.config.max_sessions} sessions are taken")
    try:
        engine_session = state.engine.open_session(avatar_id, config)  # the engine's own admission control
    except CapacityError as exc:
        state.sessions.refused_total += 1
        raise _capacity_error(str(exc), getattr(exc, "retry_after", RETRY_AFTER_S)) from exc
    except KeyError as exc:
        raise ApiError(404, f"no avatar {avatar_id!r}") from exc
    logger = SessionLog(log, {"session_id": engine_session.id})
    pump = MediaPump(
        engine_session,
        config.fps,
        state.config.subscriber_queue_frames,
        state.config.mark_frames,
        logger,
        on_failure=lambda reason: lifetime.close_later(state, session, reason),  # no zombie without frames
    )
    session = ServerSession(engine_session, new_token(), pump, logger)
    state.sessions.add(session)
    lifetime.supervise(state, session, owner)  # ends it on engine errors, after max_session_s, when idle
    session.start_task(_close_if_never_connected(state, session), "connect-timeout")
    logger.info("opened on avatar %s (fps %s, steps %s)", avatar_id, config.fps, config.steps)
    return session


async def _close_if_never_connected(state: ServerState, session: ServerSession) -> None:
    try:
        await asyncio.wait_for(session.connected_once.wait(), state.config.connect_timeout_s)
    except asyncio.TimeoutError:
        # Closed from a task of its own: closing cancels this task, which must not wait for itself.
        lifetime.close_later(state, session, f"no peer connected within {state.config.connect_timeout_s:g} s")


def _session_urls(request: web.Request, session: ServerSession) -> dict:
    base = f"{request.scheme}://{request.host}"
    ws_scheme = "wss" if request.scheme == "https" else "ws"
    path = f"/v1/sessions/{session.id}"
    return {
        "url": f"{base}{path}",
        "offer_url": f"{base}{path}/offer",
        "ws_url": f"{ws_scheme}://{request.host}{path}/ws",
        "whep_url": f"{base}{path}/whep",
        "frames_url": f"{ws_scheme}://{request.host}{path}/frames",
        "speak_url": f"{base}{path}/speak",
        "recording_url": f"{base}{path}/recording",
    }


def _session_json(session: ServerSession) -> dict:
    es = session.engine_session
    return {
        "id": session.id,
        "avatar_id": es.avatar_id,
        "state": es.state.value,
        "fps": es.config.fps,
        "steps": es.config.steps,
        "decoder": es.config.decoder,
        "width": es.width,
        "height": es.height,
        "created": session.created,
        "peers": sorted(session.peers),
        "frames": session.pump.frames,
        "measured_fps": round(session.pump.measured_fps, 2),
        "buffered_ms": round(es.buffered_ms, 1),
    }


async def create_session(request: web.Request) -> web.Response:
    state = _state(request)
    require_api_key(request, state.config.api_key)
    data = await _json_body(request, allow_empty=True)
    record = data.pop("record", False) if isinstance(data, dict) else False
    if not isinstance(record, bool):
        raise ApiError(400, "record must be true or false")
    avatar_id, config = _session_config_from_json(state, data)
    owner = client_identity(request, state.config.api_key)
    session = await _open_session(state, avatar_id, config, owner)
    body = {
        **_session_json(session),
        "token": session.token,
        **_session_urls(request, session),
        "ice_servers": [s.to_json() for s in state.config.ice_server],
    }
    if record:
        from .recording import start_for

        body["recording"] = await start_for(request.app, session)
    return web.json_response(body, status=201, headers={"Location": f"/v1/sessions/{session.id}"})


def _session_for(request: web.Request) -> ServerSession:
    state = _state(request)
    session = state.sessions.get(request.match_info["session_id"])
    if session is None:
        raise ApiError(404, f"no session {request.match_info['session_id']!r}")
    require_session_token(request, session.token, state.config.api_key)
    lifetime.touch(session)
    return session


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(_session_json(_session_for(request)))


async def delete_session(request: web.Request) -> web.Response:
    session = _session_for(request)
    await _state(request).sessions.close(session.id, "deleted by the client")
    return web.Response(status=204)


async def interrupt_session(request: web.Request) -> web.Response:
    session = _session_for(request)
    session.engine_session.interrupt()
    session.log.info("interrupted")
    return web.json_response({"id": session.id, "state": session.engine_session.state.value})


# -- WebRTC -------------------------------------------------------------------------------------------------------
async def _connect_peer(state: ServerState, session: ServerSession, name: str, offer) -> RTCPeerConnection:
    """A peer connection that sends the session's video and audio (and reads the mic, for the publisher)."""
    pc = RTCPeerConnection(rtc.rtc_configuration(state.config.ice_server))
    publisher = name == PUBLISHER

    @pc.on("track")
    def on_track(track):
        if track.kind == "audio" and publisher:
            session.start_task(rtc.read_microphone(track, session.engine_session, session.log), "mic")
        else:
            session.start_task(rtc.drain(track), "drain")

    @pc.on("connectionstatechange")
    async def on_state():
        session.log.info("%s connection %s", name, pc.connectionState)
        if pc.connectionState == "connected":
            session.connected_once.set()
        elif pc.connectionState in ("failed", "closed") and session.peers.get(name) is pc:
            if publisher:  # the session ends with its publisher
                await state.sessions.close(session.id, f"publisher connection {pc.connectionState}")
            else:
                await session.close_peer(name)

    session.peers[name] = pc
    try:
        await rtc.answer_offer(pc, offer, [AvatarAudioTrack(session.pump), AvatarVideoTrack(session.pump)])
    except BaseException:
        session.peers.pop(name, None)
        await rtc.close_quietly(pc)  # the offer's error is the answer, not a failure to clean up
        raise
    session.pump.start()  # the clock runs from the answer on; the tracks subscribe when their senders start
    return pc


async def session_offer(request: web.Request) -> web.Response:
    state = _state(request)
    session = _session_for(request)
    data = await _json_body(request)
    if data.get("type", "offer") != "offer":
        raise ApiError(400, "type must be 'offer'", code="invalid_sdp")
    limits.check_sdp(data.get("sdp"), state.config.max_sdp_bytes)
    offer = rtc.parse_description(data.get("sdp"))
    if PUBLISHER in session.peers:
        raise ApiError(409, "this session already has a publisher; add viewers with WHEP")
    pc = await _connect_peer(state, session, PUBLISHER, offer)
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})


async def whep_offer(request: web.Request) -> web.Response:
    state = _state(request)
    session = _session_for(request)
    if request.content_type != "application/sdp":
        raise ApiError(415, "WHEP: send the offer as application/sdp")
    sdp = await limits.read_body(request, state.config.max_sdp_bytes, "the SDP", code="sdp_too_large")
    offer = rtc.parse_description(limits.utf8(sdp, "the SDP", code="invalid_sdp"))
    # Checked after the last await before _connect_peer takes its place in session.peers (synchronously), so
    # concurrent offers cannot all pass the check first.
    limits.check_viewers(session, state.config.max_viewers, PUBLISHER)
    viewer = session.new_viewer_id()
    pc = await _connect_peer(state, session, viewer, offer)
    location = f"/v1/sessions/{session.id}/whep/{viewer}"
    return web.Response(
        status=201, text=pc.localDescription.sdp, content_type="application/sdp", headers={"Location": location}
    )


async def whep_delete(request: web.Request) -> web.Response:
    session = _session_for(request)
    viewer = request.match_info["viewer_id"]
    if viewer == PUBLISHER or not await session.close_peer(viewer):
        raise ApiError(404, f"no WHEP viewer {viewer!r} in this session")
    return web.Response(status=200)


async def legacy_offer(request: web.Request) -> web.Response:
    """aiortc's example protocol: POST {sdp, type} -> {sdp, type}; a new session on the default avatar."""
    state = _state(request)
    require_api_key(request, state.config.api_key)
    data = await _json_body(request)
    if data.get("type", "offer") != "offer":
        raise ApiError(400, "type must be 'offer'", code="invalid_sdp")
    limits.check_sdp(data.get("sdp"), state.config.max_sdp_bytes)
    offer = rtc.parse_description(data.get("sdp"))
    if state.default_avatar_id is None:
        raise _capacity_error("the server is starting")
    owner = client_identity(request, state.config.api_key)
    session = await _open_session(state, state.default_avatar_id, state.session_config(), owner)
    try:
        pc = await _connect_peer(state, session, PUBLISHER, offer)
    except BaseException:
        await state.sessions.close(session.id, "the offer failed")
        raise
    return web.json_response(
        {
            "sdp": pc.localDescription.sdp,
            "type": pc.localDescription.type,
            "session_id": session.id,
            "token": session.token,
        }
    )


# -- lifecycle ----------------------------------------------------------------------------------------------------
async def _start_default_avatar(app: web.Application) -> None:
    """Check the default portrait's path now (a typo fails the start), register it in the background: the port
    opens (and `/healthz` answers) at once, `/readyz` says `starting` until the portrait is encoded (minutes on a
    small CPU at 512x512, longer than a supervisor waits for a port)."""
    state = app[STATE]
    if not Path(state.config.avatar).is_file():
        raise InputError(f"--avatar: portrait not found: {state.config.avatar}")
    state.startup_task = asyncio.get_running_loop().create_task(_register_default_avatar(app), name="default-avatar")


async def _register_default_avatar(app: web.Application) -> None:
    from vexpress_rt.kps import load_reference_kps

    state = app[STATE]
    cfg = state.config
    path = Path(cfg.avatar)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()

    def register():
        image = decode_image(path.read_bytes())
        kps_path = cfg.avatar_kps_path()
        kps = load_reference_kps(kps_path) if kps_path else None
        return state.engine.add_avatar(image, kps, "default")

    try:
        avatar = await loop.run_in_executor(state.executor, register)
    except Exception as exc:
        state.startup_error = f"the default portrait {path.name} could not be registered: {exc}"
        log.exception("%s; no session can open", state.startup_error)
        return
    state.default_avatar_id = avatar.id
    log.info("default avatar %s (%s) ready in %.2f s", avatar.id, path.name, time.perf_counter() - started)
    # Graphs captured and the cost per batch size measured before /readyz says ready (engine.warm_up logs it).
    await loop.run_in_executor(state.executor, state.engine.warm_up, avatar.id)


async def _close_sessions(app: web.Application) -> None:
    state = app[STATE]
    if state.startup_task is not None:
        state.startup_task.cancel()
    await state.sessions.close_all("server shutting down")


async def _release(app: web.Application) -> None:
    state = app[STATE]
    state.executor.shutdown(wait=False, cancel_futures=True)
    if state.owns_engine:
        state.engine.close()


def create_app(config: ServerConfig, engine=None) -> web.Application:
    """The application. Without `engine`, one is built from `config` (loads the weights) and closed at cleanup;
    a given engine must be started by the caller and stays the caller's to close."""
    config.validate()
    rtc.restrict_host_addresses(config.ice_host)
    # The event loop shares the process (and the GIL) with the engine's model worker thread: a short switch
    # interval keeps the loop's wake-ups on time (at the default 5 ms, frames were dropped under load).
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
    owns = engine is None
    if owns:
        from .engine_factory import build_engine

        engine = build_engine(config)
        engine.start()
    security.install_log_redaction()  # ?token= never reaches the access log
    if config.insecure_no_auth and not config.api_key and not security.is_loopback_host(config.host):
        log.warning(
            "\n%s\nINSECURE: serving on %s with NO API KEY (--insecure-no-auth): anyone who reaches this port can\n"
            "register portraits, open sessions and read server information. Give --api-key.\n%s",
            "!" * 100, config.host, "!" * 100,
        )
    # Host and CORS checks: outermost, so errors carry them too
    origins = security.OriginPolicy(config.allowed_origin, config.host, config.allowed_host)
    app = web.Application(
        middlewares=[origins.middleware(), error_middleware], client_max_size=limits.upload_bytes(config)
    )
    app[STATE] = ServerState(config=config, engine=engine, owns_engine=owns)
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/v1/info", info)
    r.add_post("/v1/avatars", create_avatar)
    r.add_get("/v1/avatars", list_avatars)
    r.add_get("/v1/avatars/{avatar_id}", get_avatar)
    r.add_delete("/v1/avatars/{avatar_id}", delete_avatar)
    r.add_post("/v1/sessions", create_session)
    r.add_get("/v1/sessions/{session_id}", get_session)
    r.add_delete("/v1/sessions/{session_id}", delete_session)
    r.add_post("/v1/sessions/{session_id}/offer", session_offer)
    r.add_post("/v1/sessions/{session_id}/interrupt", interrupt_session)
    r.add_post("/v1/sessions/{session_id}/whep", whep_offer)
    r.add_delete("/v1/sessions/{session_id}/whep/{viewer_id}", whep_delete)
    r.add_post("/offer", legacy_offer)
    from .integrations import add_routes as add_integration_routes  # imports this module: not at the top

    add_integration_routes(app, config)  # bot websocket, frames websocket, speak, recording
    r.add_get("/{path:.+}", page_file)  # last: every API route above wins
    if not Path(config.web_root).is_dir():
        log.warning("no browser page: %s is not a folder", config.web_root)
    app.on_startup.append(_start_default_avatar)
    app.on_shutdown.append(_close_sessions)
    app.on_cleanup.append(_release)
    return app
