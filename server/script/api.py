"""A session's script over HTTP.

| method, path | what |
|---|---|
| `POST /v1/sessions/{id}/script` | start a script: 201 with its report; 409 while another one runs |
| `GET /v1/sessions/{id}/script` | its state, current item and each item's state (404 before any) |
| `POST /v1/sessions/{id}/script/{action}` | pause, resume, skip, stop: 200 with its report; 409 when not allowed |
| `DELETE /v1/sessions/{id}/script` | stop it |

The body is `multipart/form-data` with the script as JSON in the field `script` (items.py) and each audio item's file
in the field it names (`{"audio": "intro"}` -> the field `intro`; the whole upload at most `--max_upload_mb`), or,
with text, pause and mark items only, the script as an `application/json` body. Audio files are checked and decoded
like `/speak`'s (media/audio_file.py, access/sniff.py); a script names no URL to fetch (the only outbound connections
are live outputs, under server/access/outbound.py's policy: SECURITY.md). Items are decoded (text items spoken by
`--tts-command`, tts.py) shortly before they play, within the script's byte budget (`--script_audio_mb`, part of the
server's `--decoded_audio_mb`); a script with text items is refused (503) while every TTS process slot is busy. The
one-script-per-session slot is reserved before the body is read: a concurrent POST gets 409.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from streaming.params import GenerationParams
from vexpress_rt.errors import InputError

from ..access import limits
from ..access.sniff import audio_demuxer
from ..api.controls import control_changes
from ..api.session_features import SessionFeature
from ..api.speak import AUDIO_DECODING
from ..api.state import STATE, ServerState, json_body, server_state, session_for
from ..errors import ApiError
from ..media.audio_file import ByteBudget, DecodedFile, decode_off_loop
from ..session.served import ServerSession
from .items import MAX_SCRIPT_S, ScriptItem, parse_script
from .runner import ScriptRunner
from .tts import TtsCommand

ACTIONS = ("pause", "resume", "skip", "stop")


class ScriptStore:
    """Each session's latest script (by session id)."""

    def __init__(self, tts: TtsCommand | None, budget: ByteBudget, script_bytes: int):
        self.tts = tts
        self.budget = budget  # the server's decoded audio (scripts and /speak)
        self.script_bytes = script_bytes  # what one script may hold at once
        self.scripts: dict[str, ScriptRunner] = {}
        self.starting: set[str] = set()  # sessions whose POST is being read (the slot is theirs)

    def forget(self, session: ServerSession) -> None:
        self.scripts.pop(session.id, None)


SCRIPTS = web.AppKey("scripts", ScriptStore)


def setup(app: web.Application) -> None:
    state = app[STATE]
    config = state.config
    tts = (
        TtsCommand.from_config(
            config.tts_command, config.tts_timeout_s, limits.upload_bytes(config), config.tts_max_procs
        )
        if config.tts_command
        else None
    )
    budget = app[AUDIO_DECODING].budget  # speak.setup ran first
    store = app[SCRIPTS] = ScriptStore(tts, budget, int(config.script_audio_mb * 2**20))
    state.sessions.add_close_listener(store.forget)


def _shown(app: web.Application, session: ServerSession) -> dict:
    """What `GET /v1/sessions/{id}` shows of the session's script."""
    runner = app[SCRIPTS].scripts.get(session.id)
    return {"script": runner.report() if runner is not None else None}


SESSION_FEATURE = SessionFeature("script", shown=_shown)


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


def _preparer(store: ScriptStore, files: dict[str, bytes], rate: int) -> Callable[[ScriptItem], Awaitable[DecodedFile]]:
    """`prepare(item)` for the runner: an audio item's file or a text item's speech, decoded (a thread) to mono at
    the session's output rate, within the script's byte budget and its seconds of audio."""
    budget = ByteBudget(store.script_bytes, "script's decoded-audio", "script_audio_mb", parent=store.budget)
    seconds = [MAX_SCRIPT_S]  # audio the script may still decode

    async def prepare(item: ScriptItem) -> DecodedFile:
        if item.kind == "audio":
            data = files[item.audio or ""]
        else:
            assert store.tts is not None and item.text is not None
            data = await store.tts.synthesize(item.text)
        decoded = await decode_off_loop(data, seconds[0], rate, budget)
        seconds[0] -= decoded.duration_ms / 1000
        return decoded

    return prepare


async def start_script(request: web.Request) -> web.Response:
    session = session_for(request)
    store = request.app[SCRIPTS]
    old = store.scripts.get(session.id)
    if session.id in store.starting or (old is not None and old.running):
        state = old.state if old is not None and old.running else "being posted"
        raise ApiError(409, f"a script is {state} on this session: stop it first", code="conflict")
    store.starting.add(session.id)  # before the first await: concurrent POSTs find the slot taken
    try:
        return await _start(request, session, store)
    finally:
        store.starting.discard(session.id)


async def _start(request: web.Request, session: ServerSession, store: ScriptStore) -> web.Response:
    data, files = await _read_upload(request, limits.upload_bytes(server_state(request).config))
    spec = parse_script(data, set(files), store.tts is not None)
    _resolve_controls(server_state(request), session, spec.items)
    for item in spec.items:  # each file is checked by its first bytes now (415); decoded shortly before it plays
        if item.kind == "audio":
            audio_demuxer(files[item.audio or ""])
    if store.tts is not None and any(item.kind == "text" for item in spec.items):
        store.tts.check_free()  # 503 while every TTS process slot is busy
    if session.closed:
        raise ApiError(404, "the session has ended")
    rate = session.engine_session.config.output_sample_rate
    runner = ScriptRunner(uuid.uuid4().hex[:10], session, spec, _preparer(store, files, rate))
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
