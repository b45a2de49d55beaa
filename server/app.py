"""The HTTP API: `create_app(config, engine)` builds the aiohttp application; handlers only adapt HTTP to the engine.

| method, path | auth | what |
|---|---|---|
| GET / (and the page's files) | - | the browser page (`web_client/`) |
| GET /healthz, /readyz, /metrics, /v1/info | - | liveness; 503 + Retry-After at capacity; Prometheus; settings |
| POST /v1/avatars, GET /v1/avatars, GET/DELETE /v1/avatars/{id} | key | portraits (pre-encoded on upload) |
| POST /v1/sessions | key | a session: id, token and its URLs |
| GET/DELETE /v1/sessions/{id}, POST .../offer, .../interrupt | token | the session, its WebRTC publisher |
| PATCH /v1/sessions/{id} | token | change live controls: strength, style, motion, blink rate (`api/controls.py`) |
| GET /v1/styles; POST/GET /v1/motions | -; key | expression styles; uploaded motions (kps file or short video) |
| DELETE /v1/motions/{id} | key | forget an uploaded motion (sessions following it keep their copy) |
| POST/OPTIONS /v1/sessions/{id}/whep, PATCH/DELETE/OPTIONS .../whep/{viewer} | token, view | WHEP (`webrtc/whep.py`) |
| GET /view/{id}?token= | - | the chromeless viewer page (OBS browser source; `webrtc/viewer.py`), `view_url` |
| POST /offer | key | aiortc-example compatible: a session on the default avatar, answered at once |
| GET /v1/sessions/{id}/ws | token | the bot websocket (`websockets/bot.py`: PCM16 in, JSON controls and events) |
| GET /v1/sessions/{id}/frames | token | every frame as JPEG + PCM16 with timestamps (`websockets/frames.py`) |
| POST /v1/sessions/{id}/speak | token | an audio file said as one utterance (`api/speak.py`) |
| POST/DELETE/GET /v1/sessions/{id}/recording | token | MP4 recording of the session (`outputs/recording.py`) |
| POST/GET /v1/sessions/{id}/outputs, DELETE .../outputs/{output} | token | push to RTMP/SRT/WHIP (`outputs/`) |
| POST/GET/DELETE /v1/sessions/{id}/script, POST .../script/{action} | token | play a script (`script/`) |

"key": the API key when the server has one (else open); "token": the session's token or the API key; "view": also
the session's view-only token (`view_url`), refused (403) everywhere else.
Each group of routes has its handlers in the folder that owns it (README: the server's folders), sharing the
state and request helpers of `api/state.py`; this module builds the route table and lists the session features.
Websocket schemas: docs/websocket.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from streaming.device_pool import DevicePool
from streaming.engine import Engine
from streaming.framing import MAX_BACKGROUND_BYTES, MAX_OUTPUT_PIXELS, MAX_OUTPUT_SIDE, MIN_OUTPUT_SIDE
from streaming.presets import PRESETS

from . import metrics
from .access import limits, origins, proxy
from .api import avatars, controls, scrape, sessions, speak
from .api.session_features import SESSION_FEATURES
from .api.state import RETRY_AFTER_S, STATE, ServerState, may_control, server_state
from .errors import ApiError, error_middleware
from .outputs import api as outputs
from .outputs import recording
from .script import api as script
from .settings.config import ServerConfig
from .webrtc import peer, publisher, viewer, whep
from .websockets import bot, frames, sockets

log = logging.getLogger("server")

VERSION = "0.1.0"
GIL_SWITCH_INTERVAL_S = 0.001


# -- basic endpoints ----------------------------------------------------------------------------------------------
async def index(request: web.Request) -> web.StreamResponse:
    page = Path(server_state(request).config.web_root) / "index.html"
    if not page.is_file():
        raise ApiError(404, f"the browser page is not installed ({page} is missing)")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def page_file(request: web.Request) -> web.StreamResponse:
    """The page's other files (scripts, styles), from the web root only."""
    root = Path(server_state(request).config.web_root).resolve()
    path = (root / request.match_info["path"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(404, f"not found: /{request.match_info['path']}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    pool = server_state(request).engine
    if not pool.healthy_count():  # every device's worker failed: only a restart brings the server back
        return web.json_response({"status": "failed", "error": "every device has failed"}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = server_state(request)
    body = {
        "sessions": len(state.sessions),
        "max_sessions": state.config.max_sessions,
        "devices": [d.to_dict() for d in state.engine.status()],  # ready while one device is healthy
    }
    if state.startup_error is not None:
        return web.json_response({"status": "failed", "error": state.startup_error, **body}, status=503)
    if state.default_avatar_id is None:
        return web.json_response(
            {"status": "starting", **body}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    if not state.engine.warm:
        return web.json_response({"status": "warming", **body}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    if not state.engine.healthy_count():
        return web.json_response({"status": "failed", "error": "every device has failed", **body}, status=503)
    if state.at_capacity():
        return web.json_response({"status": "full", **body}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return web.json_response({"status": "ready", **body})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = server_state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def info(request: web.Request) -> web.Response:
    state = server_state(request)
    cfg = state.config
    control = may_control(request, cfg)  # what only a key holder may see: the model's folder, the avatars
    model: dict[str, Any] = {
        "name": "V-Express",
        "device": state.engine.device_name,
    }  # the (first) device in use, not the flag
    if state.engine.simulated is not None:  # sim:<profile>: no model runs, frames are marked (streaming/sim/)
        model["simulated"] = state.engine.simulated
    if control:
        model["model_dir"] = str(cfg.model_dir)
    portraits = [avatars.avatar_json(a, state.default_avatar_id) for a in state.engine.avatars()] if control else None
    return web.json_response(
        {
            "version": VERSION,
            "model": model,
            "width": cfg.width,
            "height": cfg.height,
            "fps": cfg.fps,
            "steps": state.default_params().steps,
            "presets": list(PRESETS),  # "preset" in POST /v1/sessions (streaming/presets.py)
            "generation": state.default_params().limits(),  # per field: default, range or choices
            # the model's crop (a session's frames with framing "crop"); framed sessions report their own size
            "crop": {"width": cfg.width, "height": cfg.height},
            "framing": {  # POST /v1/sessions "framing" and "background" (docs/framing.md)
                "framings": ["crop", "portrait", "WxH"],
                "backgrounds": ["photo", "#rrggbb", "data:image/...;base64,...", "transparent"],
                "default": {"framing": "crop", "background": "photo"},
                "output_side": [MIN_OUTPUT_SIDE, MAX_OUTPUT_SIDE],
                "max_output_pixels": MAX_OUTPUT_PIXELS,
                "max_background_bytes": MAX_BACKGROUND_BYTES,
            },
            "decoder": state.engine.config.default_session.decoder,
            "decoders": list(state.engine.decoders),
            "max_sessions": cfg.max_sessions,
            "sessions": len(state.sessions),
            "codecs": {"video": ["VP8", "H264"], "audio": ["opus"]},
            "audio_out": {"sample_rate": 48000, "channels": 1, "packet_ms": 20},
            # TURN credentials only to callers who may open sessions (they get them with the session anyway)
            "ice_servers": [s.to_json(with_credentials=control) for s in cfg.ice_server],
            # --turn-url: each session's creation reply carries them with that session's own credentials
            "turn_urls": list(cfg.turn_url),
            "auth": {"api_key": cfg.api_key is not None},
            "default_avatar_id": state.default_avatar_id,
            **({"avatars": portraits} if control else {}),
            "mark_frames": cfg.mark_frames,
            "devices": [d.to_dict() for d in state.engine.status()],  # one model worker each (--devices)
        }
    )


# -- lifecycle ---------------------------------------------------------------------------------------------------
async def _close_sessions(app: web.Application) -> None:
    state = app[STATE]
    if state.startup_task is not None:
        state.startup_task.cancel()
    await state.sessions.close_all("server shutting down")


async def _release(app: web.Application) -> None:
    state = app[STATE]
    state.executor.shutdown(wait=False, cancel_futures=True)


def create_app(config: ServerConfig, engine: Engine | DevicePool) -> web.Application:
    """The application over `engine` (or a pool of them), started by the caller and the caller's to close (the
    in-process server, server/serving/inprocess.py, builds one from `config` when it is given none)."""
    config.validate()
    peer.restrict_host_addresses(config.ice_host)
    # The event loop shares the process (and the GIL) with the engine's model worker thread: a short switch
    # interval keeps the loop's wake-ups on time (at the default 5 ms, frames were dropped under load).
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
    pool = engine if isinstance(engine, DevicePool) else DevicePool([engine])
    origins.install_log_redaction()  # ?token= never reaches the access log
    if config.insecure_no_auth and not config.api_key and not origins.is_loopback_host(config.host):
        log.warning(
            "\n%s\nINSECURE: serving on %s with NO API KEY (--insecure-no-auth): anyone who reaches this port can\n"
            "register portraits, open sessions and read server information. Give --api-key.\n%s",
            "!" * 100,
            config.host,
            "!" * 100,
        )
    # Host and CORS checks: outermost, so errors carry them too
    origin_policy = origins.OriginPolicy(config.allowed_origin, config.host, config.allowed_host)
    # a trusted reverse proxy's scheme and client address first, so that every check and URL after it sees them
    forwarded = proxy.middleware(proxy.parse_networks(config.trusted_proxy))
    app = web.Application(
        middlewares=[forwarded, origin_policy.middleware(), error_middleware],
        client_max_size=limits.upload_bytes(config),
    )
    state = app[STATE] = ServerState(config=config, engine=pool)
    state.metrics.attach(scrape.StateCollector(state))
    # what each feature adds to POST/GET /v1/sessions (api/session_features.py)
    app[SESSION_FEATURES] = (
        publisher.SESSION_FEATURE,
        recording.SESSION_FEATURE,
        outputs.SESSION_FEATURE,
        script.SESSION_FEATURE,
    )
    r = app.router
    r.add_get("/", index)
    r.add_get("/view/{session_id}", viewer.viewer_page)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/v1/info", info)
    r.add_post("/v1/avatars", avatars.create_avatar)
    r.add_get("/v1/avatars", avatars.list_avatars)
    r.add_get("/v1/avatars/{avatar_id}", avatars.get_avatar)
    r.add_delete("/v1/avatars/{avatar_id}", avatars.delete_avatar)
    r.add_post("/v1/sessions", sessions.create_session)
    r.add_get("/v1/sessions/{session_id}", sessions.get_session)
    r.add_delete("/v1/sessions/{session_id}", sessions.delete_session)
    r.add_patch("/v1/sessions/{session_id}", controls.patch_session)
    r.add_get("/v1/styles", controls.list_styles)
    r.add_post("/v1/motions", controls.create_motion)
    r.add_get("/v1/motions", controls.list_motions)
    r.add_delete("/v1/motions/{motion_id}", controls.delete_motion)
    r.add_post("/v1/sessions/{session_id}/interrupt", sessions.interrupt_session)
    r.add_post("/v1/sessions/{session_id}/offer", publisher.session_offer)
    whep_path, viewer_path = "/v1/sessions/{session_id}/whep", "/v1/sessions/{session_id}/whep/{viewer_id}"
    r.add_post(whep_path, whep.whep_offer)
    r.add_options(whep_path, whep.endpoint_options)
    r.add_patch(viewer_path, whep.whep_patch)
    r.add_delete(viewer_path, whep.whep_delete)
    r.add_options(viewer_path, whep.resource_options)
    whep.setup(app)
    r.add_post("/offer", publisher.legacy_offer)
    r.add_get("/v1/sessions/{session_id}/ws", bot.bot_socket)
    r.add_get("/v1/sessions/{session_id}/frames", frames.frames_socket)
    r.add_post("/v1/sessions/{session_id}/speak", speak.speak)
    speak.setup(app)  # the decoded-audio budget, shared with scripts
    recording_path = "/v1/sessions/{session_id}/recording"
    r.add_post(recording_path, recording.start_recording)
    r.add_delete(recording_path, recording.stop_recording)
    r.add_get(recording_path, recording.get_recording)
    r.add_post("/v1/sessions/{session_id}/outputs", outputs.add_output)  # RTMP/SRT/WHIP pushes (server/outputs/)
    r.add_get("/v1/sessions/{session_id}/outputs", outputs.list_outputs)
    r.add_delete("/v1/sessions/{session_id}/outputs/{output_id}", outputs.delete_output)
    outputs.setup(app)
    r.add_post("/v1/sessions/{session_id}/script", script.start_script)  # scripts (server/script/)
    r.add_get("/v1/sessions/{session_id}/script", script.get_script)
    r.add_delete("/v1/sessions/{session_id}/script", script.stop_script)
    r.add_post("/v1/sessions/{session_id}/script/{action}", script.control_script)
    script.setup(app)
    sockets.setup(app)  # open websockets closed at shutdown, the frame-encoding pool
    recording.setup(app, config.recording_dir, config.recording_retention_s, int(config.recordings_quota_mb * 2**20))
    r.add_get("/{path:.+}", page_file)  # last: every API route above wins
    if not Path(config.web_root).is_dir():
        log.warning("no browser page: %s is not a folder", config.web_root)
    app.on_startup.append(avatars.start_default_avatar)
    app.on_shutdown.append(_close_sessions)
    app.on_cleanup.append(_release)
    return app
