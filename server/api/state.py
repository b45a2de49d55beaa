"""What every handler module shares: the server's state (one per app, under `STATE`), the session lookup with its
token check, and the request helpers (JSON body, capacity errors).

Handler modules (`avatars`, `session_api`, `webrtc`, `ws`, `frames_ws`, `speak`, `recording`) import this module,
never `app.py`; `app.py` builds the application and its route table from them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from streaming.device_pool import DevicePool
from streaming.params import GenerationParams
from streaming.session_config import SessionConfig
from streaming.styles import load_styles

from ..access import limits
from ..access.auth import has_api_key, has_token, require_session_token
from ..errors import ApiError
from ..metrics import ServerMetrics
from ..session.served import ServerSession, SessionRegistry
from ..settings.config import ServerConfig

log = logging.getLogger("server")

RETRY_AFTER_S = 5


@dataclass
class ServerState:
    config: ServerConfig
    engine: DevicePool  # one engine per device (a single engine is a pool of one)
    sessions: SessionRegistry = field(default_factory=SessionRegistry)
    default_avatar_id: str | None = None  # None while the default portrait is being registered
    startup_task: asyncio.Task | None = None
    startup_error: str | None = None  # why the default portrait could not be registered
    avatar_jobs: limits.PendingLimit = field(
        default_factory=lambda: limits.PendingLimit(limits.MAX_PENDING_AVATARS, "portrait registrations")
    )
    motion_videos: limits.PendingLimit = field(
        default_factory=lambda: limits.PendingLimit(limits.MAX_PENDING_MOTION_VIDEOS, "motion video extractions")
    )
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar")
    )
    metrics: ServerMetrics = field(default_factory=ServerMetrics)  # this app's Prometheus registry
    avatar_places: limits.Reservations = field(default_factory=limits.Reservations)  # registrations in flight
    styles: dict[str, dict] = field(default_factory=dict)  # expression styles by name (streaming/styles.py)

    def __post_init__(self) -> None:
        self.styles = load_styles(self.config.styles)  # checked when the config was validated
        self.sessions.add_close_listener(lambda session: self.metrics.forget(session.engine_session))

    def engine_stats(self) -> dict:
        try:
            return dict(self.engine.stats())
        except Exception:
            log.exception("engine.stats() failed")
            return {}

    def avatar_count(self) -> int:
        return len(self.engine.avatars())

    def session_defaults(self) -> SessionConfig:
        """The defaults of this server's sessions: its engine's, with `serve --preset` and `--steps` (an engine
        shared by several servers, as in the tests, may have been made with other settings)."""
        return self.config.session_defaults(self.engine.config.default_session)

    def default_params(self) -> GenerationParams:
        return self.session_defaults().params

    def session_config(self, **overrides: object) -> SessionConfig:
        """The server's session defaults with the given (not None) values: validated here, once."""
        defaults = self.session_defaults()
        values: dict = {
            "fps": self.config.fps,
            "params": defaults.params,
            "lookahead_s": defaults.lookahead_s,
            "max_buffer_s": self.config.max_buffer_s,
            "decoder": defaults.decoder,  # --decoder, resolved when the engine loaded
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SessionConfig(**values)

    def at_capacity(self, session_config: SessionConfig | None = None) -> bool:
        if len(self.sessions) >= self.config.max_sessions:
            return True
        return not self.engine.can_admit(session_config or self.session_config())


STATE = web.AppKey("state", ServerState)


def server_state(request: web.Request) -> ServerState:
    return request.app[STATE]


def session_for(request: web.Request, watching: bool = False) -> ServerSession:
    """The ServerSession named in the path; 404 for unknown ids, 401 without its token, 403 with its view token
    (before any upgrade). `watching` (the WHEP endpoint and resources): the view token is accepted too; a viewer
    with it is not input, so it does not keep an idle session alive."""
    state = server_state(request)
    session = state.sessions.get(request.match_info["session_id"])
    if session is None:
        raise ApiError(404, f"no session {request.match_info['session_id']!r}")
    if watching and has_token(request, session.view_token):
        return session
    require_session_token(request, session.token, state.config.api_key, session.view_token)
    session.touch()
    return session


def capacity_error(reason: str = "the server is at capacity", retry_after: float = RETRY_AFTER_S) -> ApiError:
    headers = {"Retry-After": str(max(1, round(retry_after)))}
    return ApiError(503, f"{reason}; try again later", code="capacity", headers=headers)


def may_control(request: web.Request, config: ServerConfig) -> bool:
    """Open server, or the request carries an API key."""
    return config.api_key is None or has_api_key(request, config.api_key)


async def json_body(request: web.Request, allow_empty: bool = False) -> dict:
    data = await limits.read_body(request, limits.json_bytes(server_state(request).config), "the JSON body")
    text = limits.utf8(data, "the JSON body", code="invalid_json")
    if not text.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "a JSON body is required", code="invalid_json")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON: {str(exc)[:200]}", code="invalid_json") from exc
    if not isinstance(value, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return value
