"""Sessions: `POST /v1/sessions`, `GET/DELETE /v1/sessions/{id}`, `POST .../interrupt`; `open_session` is shared
with the aiortc-compatible `POST /offer` (webrtc/publisher.py). What recording, outputs, scripts and TURN add to a
session comes through `session_features` (registered by app.py)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields

from aiohttp import web

from streaming import styles
from streaming.engine import CapacityError
from streaming.params import GenerationParams
from streaming.presets import preset_named
from streaming.session_config import SessionConfig

from ..access import limits
from ..access.auth import client_identity, new_token, require_api_key
from ..errors import ApiError
from ..media.pump import MediaPump
from ..session import lifetime
from ..session.served import ServerSession, SessionLog
from . import session_features
from .controls import shown_names
from .state import ServerState, capacity_error, json_body, server_state, session_for

log = logging.getLogger("server")

PARAM_FIELDS = frozenset(f.name for f in fields(GenerationParams))  # steps, weights, guidance, window, seed...
SESSION_FIELDS = {"avatar_id", "fps", "decoder", "audio", "preset", "style", "framing", "background", *PARAM_FIELDS}


# -- sessions -----------------------------------------------------------------------------------------------------
def session_config_from_json(state: ServerState, data: dict) -> tuple[str, SessionConfig]:
    """The body of `POST /v1/sessions` as a SessionConfig: where its values enter, so where they are validated
    (each field with its one message; InputError -> 400). Absent or null fields take the server's defaults."""
    unknown = set(data) - SESSION_FIELDS
    if unknown:
        raise ApiError(400, f"unknown fields: {shown_names(unknown)}")
    avatar_id = data.get("avatar_id") or state.default_avatar_id
    if avatar_id is None:
        raise capacity_error("the server is starting (the default portrait is being encoded)")
    if not isinstance(avatar_id, str):
        raise ApiError(400, "avatar_id must be a string")
    audio = data.get("audio") or {}
    if not isinstance(audio, dict) or set(audio) - {"sample_rate", "channels"}:
        raise ApiError(400, 'audio must be an object {"sample_rate", "channels"}')
    transport = {
        "fps": data.get("fps"),
        "input_sample_rate": audio.get("sample_rate"),
        "input_channels": audio.get("channels"),
    }
    for key, value in transport.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ApiError(400, f"{key} must be an integer")
    for key in ("decoder", "framing", "background"):  # framing, background: checked by SessionConfig
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ApiError(400, f"{key} must be a string")
    defaults = state.session_defaults()
    if data.get("preset") is not None:  # a schedule (streaming/presets.py), then a style, then the fields given
        defaults = preset_named(data["preset"]).applied(defaults)
    base = styles.apply(state.styles, data.get("style"), defaults.params)
    params = GenerationParams.from_dict({k: data[k] for k in PARAM_FIELDS & set(data)}, base)
    config = state.session_config(
        params=params,
        lookahead_s=defaults.lookahead_s,
        decoder=data.get("decoder"),
        framing=data.get("framing"),
        background=data.get("background"),
        **transport,
    )
    return avatar_id, config


async def open_session(
    state: ServerState, avatar_id: str, config: SessionConfig, owner: str | None = None
) -> ServerSession:
    """`owner`: who the session counts against (--max_sessions_per_key)."""
    if state.engine.get_avatar(avatar_id) is None:
        raise ApiError(404, f"no avatar {avatar_id!r}")
    limits.check_session_quota(state, owner)
    if len(state.sessions) >= state.config.max_sessions:
        state.sessions.refused_total += 1
        raise capacity_error(f"all {state.config.max_sessions} sessions are taken")
    try:
        engine_session = state.engine.open_session(avatar_id, config)  # the engine's own admission control
    except CapacityError as exc:
        state.sessions.refused_total += 1
        raise capacity_error(str(exc), exc.retry_after) from exc
    except KeyError as exc:
        raise ApiError(404, f"no avatar {avatar_id!r}") from exc
    logger = SessionLog(log, {"session_id": engine_session.id})
    session: ServerSession  # made below, after its pump (whose failure callback closes it)
    pump = MediaPump(
        engine_session,
        config.fps,
        state.config.subscriber_queue_frames,
        state.config.mark_frames,
        logger,
        on_failure=lambda reason: lifetime.close_later(state, session, reason),  # no zombie without frames
        on_queued=state.metrics.queue_depth.observe,
        read_off_loop=not engine_session.composer.identity,  # framed/matted frames: composed off the loop
    )
    session = ServerSession(
        engine_session,
        new_token(),
        new_token(),
        pump,
        logger,
        limits.RequestRate(state.config.max_control_changes_per_s, "control changes"),
        owner,
    )
    state.sessions.add(session)
    lifetime.supervise(state, session)  # ends it on engine errors, after max_session_s, when idle
    session.start_task(_close_if_never_connected(state, session), "connect-timeout")
    logger.info("opened on avatar %s (fps %s, %s)", avatar_id, config.fps, config.params)
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
        # the OBS viewer page, with the session's view-only token: it can watch (WHEP) and nothing else
        "view_url": f"{base}/view/{session.id}?token={session.view_token}",
    }


def _session_json(session: ServerSession) -> dict:
    es = session.engine_session
    return {
        "id": session.id,
        "avatar_id": es.avatar_id,
        "state": es.state.value,
        "fps": es.config.fps,
        "steps": es.config.params.steps,
        "params": es.controls.params.to_dict(),  # as last changed (PATCH, control messages)
        "lookahead_s": es.config.lookahead_s,  # with steps and new_frames, the schedule (a preset's, or its fields)
        "control_version": es.controls.version,  # the last change (PATCH's "version"); 0: as created
        "idle": "live" if es.live_idle else "clip",  # live: idle frames generated to follow the motion
        "decoder": es.config.decoder,
        "framing": es.config.framing,
        # a data: URL image can be megabytes: named, not echoed
        "background": "image" if es.config.background.startswith("data:") else es.config.background,
        "width": es.width,
        "height": es.height,
        "created": session.created,
        "peers": sorted(session.peers),
        "frames": session.pump.frames,
        "measured_fps": round(session.pump.measured_fps, 2),
        "buffered_ms": round(es.buffered_ms, 1),
    }


async def create_session(request: web.Request) -> web.Response:
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    data = await json_body(request, allow_empty=True)
    checked = await session_features.check_body(request, data)  # "record", "outputs"...: before the session opens
    avatar_id, config = session_config_from_json(state, data)
    owner = client_identity(request, state.config.api_key)
    session = await open_session(state, avatar_id, config, owner)
    body = {
        **_session_json(session),
        "token": session.token,
        "view_token": session.view_token,  # watch only: WHEP and the viewer page (view_url carries it)
        **_session_urls(request, session),
        "device": state.engine.device_of(session.id),  # the device (--devices) it was placed on
        **await session_features.opened_fields(request, session, checked),
    }
    return web.json_response(body, status=201, headers={"Location": f"/v1/sessions/{session.id}"})


async def get_session(request: web.Request) -> web.Response:
    session = session_for(request)
    return web.json_response({**_session_json(session), **session_features.shown_fields(request.app, session)})


async def delete_session(request: web.Request) -> web.Response:
    session = session_for(request)
    await server_state(request).sessions.close(session.id, "deleted by the client")
    return web.Response(status=204)


async def interrupt_session(request: web.Request) -> web.Response:
    session = session_for(request)
    session.engine_session.interrupt()
    session.log.info("interrupted")
    return web.json_response({"id": session.id, "state": session.engine_session.state.value})
