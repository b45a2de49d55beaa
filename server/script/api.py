"""A session's script over HTTP.

| method, path | what |
|---|---|
| `POST /v1/sessions/{id}/script` | start a script: 201 with its report; 409 while another one runs |
| `GET /v1/sessions/{id}/script` | its state, current item and each item's state (404 before any) |
| `POST /v1/sessions/{id}/script/{action}` | pause, resume, skip, stop: 200 with its report; 409 when not allowed |
| `DELETE /v1/sessions/{id}/script` | stop it |

The body is `multipart/form-data` with the script as JSON in the field `script` (items.py) and each audio item's
file in the field it names (`{"audio": "intro"}` -> the field `intro`; the whole upload at most `--max_upload_mb`),
or, with text, pause and mark items only, the script as an `application/json` body. Audio files are checked and
decoded like `/speak`'s (speak.py, sniff.py); the server fetches no URLs. Text items are spoken by `--tts-command`
(tts.py) before the script starts (state `preparing`).
"""

from __future__ import annotations

import asyncio
import json
import uuid

from aiohttp import web

from vexpress_rt.errors import InputError
from vexpress_rt.params import GenerationParams

from .. import limits
from ..controls_api import control_changes
from ..errors import ApiError
from ..sessions import ServerSession
from ..sniff import audio_demuxer
from ..speak import DecodedFile, decode_audio_bytes
from ..state import STATE, ServerState, json_body, server_state, session_for
from ..tts import TtsCommand
from .items import MAX_SCRIPT_S, ScriptItem, parse_script
from .runner import ScriptRunner

ACTIONS = ("pause", "resume", "skip", "stop")


class ScriptStore:
    """Each session's latest script (by session id)."""

    def __init__(self, tts: TtsCommand | None):
        self.tts = tts
        self.scripts: dict[str, ScriptRunner] = {}

    def forget(self, session: ServerSession) -> None:
        self.scripts.pop(session.id, None)


SCRIPTS = web.AppKey("scripts", ScriptStore)


def setup(app: web.Application) -> None:
    state = app[STATE]
    config = state.config
    tts = (
        TtsCommand.from_config(config.tts_command, config.tts_timeout_s, limits.upload_bytes(config))
        if config.tts_command
        else None
    )
    store = app[SCRIPTS] = ScriptStore(tts)
    state.sessions.add_close_listener(store.forget)


def session_fields(app: web.Application, session: ServerSession) -> dict:
    """What `GET /v1/sessions/{id}` shows of the session's script."""
    runner = app[SCRIPTS].scripts.get(session.id)
    return {"script": runner.report() if runner is not None else None}


async def _read_upload(request: web.Request, limit: int) -> tuple[object, dict[str, bytes]]:
    """(the script's JSON, the uploaded files by field name)."""
    if not request.content_type.startswith("multipart/"):
        return await json_body(request), {}
    files: dict[str, bytes] = {}
    script_text: bytes | None = None
    total = 0
    try:
        async for part in limits.form_parts(request):
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                data += chunk
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, f"the upload is larger than {limit / 2**20:g} MiB", code="payload_too_large")
            if part.name == "script":
                script_text = bytes(data)
            elif part.name:
                files[part.name] = bytes(data)
    except (ValueError, AssertionError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from exc
    if script_text is None:
        raise ApiError(400, "the form needs a 'script' field (the script as JSON)")
    try:
        return json.loads(limits.utf8(script_text, "the script")), files
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the script is not JSON: {str(exc)[:200]}", code="invalid_json") from exc


def _preparer(store: ScriptStore, files: dict[str, bytes]):
    """`prepare(item)` for the runner: an audio item's file or a text item's speech, decoded (a thread)."""
    budget = [MAX_SCRIPT_S]  # seconds of audio the script may still hold

    async def prepare(item: ScriptItem) -> DecodedFile:
        loop = asyncio.get_running_loop()
        if item.kind == "audio":
            data = files[item.audio or ""]
        else:
            assert store.tts is not None and item.text is not None
            data = await store.tts.synthesize(item.text)
        decoded = await loop.run_in_executor(None, decode_audio_bytes, data, budget[0])
        budget[0] -= decoded.duration_ms / 1000
        return decoded

    return prepare


async def start_script(request: web.Request) -> web.Response:
    session = session_for(request)
    store = request.app[SCRIPTS]
    old = store.scripts.get(session.id)
    if old is not None and old.running:
        raise ApiError(409, f"a script is {old.state} on this session: stop it first", code="conflict")
    data, files = await _read_upload(request, limits.upload_bytes(server_state(request).config))
    spec = parse_script(data, set(files), store.tts is not None)
    _resolve_controls(server_state(request), session, spec.items)
    for item in spec.items:  # each file is checked by its first bytes now (415); decoded when the script prepares
        if item.kind == "audio":
            audio_demuxer(files[item.audio or ""])
    runner = ScriptRunner(uuid.uuid4().hex[:10], session, spec, _preparer(store, files))
    store.scripts[session.id] = runner
    session.log.info("script %s: %d items", runner.id, len(spec.items))
    return web.json_response(runner.report(), status=201, headers={"Location": request.path})


def _resolve_controls(state: ServerState, session: ServerSession, items: list[ScriptItem]) -> None:
    """Each item's style and controls as the changes it makes, checked now against the server's styles and the
    session's controls (400 for an unknown style, a non-live field or a value out of range)."""
    for index, item in enumerate(items):
        if item.style is None and item.controls is None:
            continue
        request = {**({"style": item.style} if item.style is not None else {}), **(item.controls or {})}
        try:
            item.changes = control_changes(state, request)
            GenerationParams.from_dict(item.changes, session.engine_session.controls.params)  # values in range
        except InputError as exc:
            raise ApiError(400, f"item {index}: {exc}") from None


def _runner(request: web.Request) -> ScriptRunner:
    session = session_for(request)
    runner = request.app[SCRIPTS].scripts.get(session.id)
    if runner is None:
        raise ApiError(404, "this session has no script; start one with POST .../script")
    return runner


async def get_script(request: web.Request) -> web.Response:
    return web.json_response(_runner(request).report())


async def control_script(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise ApiError(404, f"no script action {action!r} (one of {', '.join(ACTIONS)})")
    runner = _runner(request)
    control = {"pause": runner.pause, "resume": runner.resume, "skip": runner.skip, "stop": runner.stop}[action]
    try:
        await control()
    except ValueError as exc:
        raise ApiError(409, str(exc), code="conflict") from exc
    runner.session.log.info("script %s: %s", runner.id, action)
    return web.json_response(runner.report())


async def stop_script(request: web.Request) -> web.Response:
    runner = _runner(request)
    await runner.stop()
    return web.json_response(runner.report())
