"""A script's items, validated where they enter (the API body, `vexpress-rt present`'s YAML).

    {"start_at": 1767225600,                     # optional: unix time to start at (default: now)
     "items": [
       {"audio": "intro"},                        # the uploaded file in the form field "intro"
       {"mark": "chapter-1"},                     # an event when everything before it has played
       {"pause_s": 0.5},                          # half a second of silence
       {"text": "Welcome to the show.", "style": "warm", "controls": {...}}]}   # spoken by --tts-command

`style` (a name) and `controls` (an object) may go on audio and text items: live controls (docs/controls.md)
changed when the item starts, as a PATCH of the session would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ..errors import ApiError

MAX_ITEMS = 200
MAX_PAUSE_S = 600.0
MAX_SCRIPT_S = 1800.0  # audio of one script, pauses included (decoded, it is held in memory)
MAX_NAME = 256
MAX_STYLE = 64
MAX_CONTROLS_BYTES = 4096
MAX_START_AHEAD_S = 86400.0
KINDS = ("audio", "text", "pause_s", "mark")


@dataclass
class ScriptItem:
    kind: str  # "audio" | "text" | "pause" | "mark"
    audio: str | None = None  # the form field of an audio item's file
    text: str | None = None
    pause_s: float = 0.0
    mark: str | None = None
    style: str | None = None
    controls: dict | None = None
    # what the item changes when it starts: its style's fields, then its own controls (resolved and checked by the
    # API against the server's styles and the session's controls, so a bad one is refused when the script is posted)
    changes: dict | None = None

    @property
    def speaks(self) -> bool:
        """Plays audio (an utterance of its own): audio, text and pause items."""
        return self.kind != "mark"

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind}
        for key in ("audio", "text", "mark", "style", "controls"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.kind == "pause":
            out["pause_s"] = self.pause_s
        return out


@dataclass
class ScriptSpec:
    items: list[ScriptItem]
    start_at: float | None = None  # unix time


def _item(index: int, data: object, files: set[str], tts: bool) -> ScriptItem:
    where = f"item {index}"
    if not isinstance(data, dict):
        raise ApiError(400, f"{where}: an item is an object with one of {', '.join(KINDS)}")
    given = [k for k in KINDS if k in data]
    if len(given) != 1:
        raise ApiError(400, f"{where}: give exactly one of {', '.join(KINDS)}")
    unknown = set(data) - {*KINDS, "style", "controls"}
    if unknown:
        raise ApiError(400, f"{where}: unknown fields {', '.join(sorted(unknown))}")
    kind = given[0]
    style, controls = data.get("style"), data.get("controls")
    if (style is not None or controls is not None) and kind not in ("audio", "text"):
        raise ApiError(400, f"{where}: style and controls go on audio and text items")
    if style is not None and (not isinstance(style, str) or not 0 < len(style) <= MAX_STYLE):
        raise ApiError(400, f"{where}: style must be a name of 1 to {MAX_STYLE} characters")
    if controls is not None and (not isinstance(controls, dict) or len(json.dumps(controls)) > MAX_CONTROLS_BYTES):
        raise ApiError(400, f"{where}: controls must be an object (at most {MAX_CONTROLS_BYTES} bytes of JSON)")
    value = data[kind]
    if kind == "audio":
        if not isinstance(value, str) or value not in files:
            raise ApiError(400, f"{where}: 'audio' names a file field of the upload; {value!r} is not one")
        return ScriptItem("audio", audio=value, style=style, controls=controls)
    if kind == "text":
        if not tts:
            raise ApiError(400, f"{where}: text items need a TTS command (serve --tts-command)", code="no_tts")
        if not isinstance(value, str) or not value.strip():
            raise ApiError(400, f"{where}: 'text' must be a non-empty string")
        return ScriptItem("text", text=value, style=style, controls=controls)
    if kind == "pause_s":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_PAUSE_S:
            raise ApiError(400, f"{where}: pause_s must be a number of seconds, above 0 and at most {MAX_PAUSE_S:g}")
        return ScriptItem("pause", pause_s=float(value))
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise ApiError(400, f"{where}: 'mark' must be a name of 1 to {MAX_NAME} characters")
    return ScriptItem("mark", mark=value)


def parse_script(data: object, files: set[str], tts: bool, now: float | None = None) -> ScriptSpec:
    """The script of a request: `files` are the names of the uploaded files, `tts` whether text items can be
    spoken. ApiError 400 for anything malformed."""
    if not isinstance(data, dict):
        raise ApiError(400, 'a script is an object {"items": [...], "start_at"?}')
    unknown = set(data) - {"items", "start_at"}
    if unknown:
        raise ApiError(400, f"unknown script fields: {', '.join(sorted(unknown))}")
    items = data.get("items")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS:
        raise ApiError(400, f"a script needs 'items': a list of 1 to {MAX_ITEMS} items")
    parsed = [_item(i, item, files, tts) for i, item in enumerate(items)]
    start_at = data.get("start_at")
    if start_at is not None:
        now = time.time() if now is None else now
        if isinstance(start_at, bool) or not isinstance(start_at, (int, float)):
            raise ApiError(400, "start_at must be a unix time in seconds")
        if not now - 60 <= start_at <= now + MAX_START_AHEAD_S:
            raise ApiError(400, f"start_at must be within the next {MAX_START_AHEAD_S / 3600:g} h")
    if sum(i.pause_s for i in parsed) > MAX_SCRIPT_S:
        raise ApiError(413, f"a script's pauses last more than {MAX_SCRIPT_S:g} s", code="payload_too_large")
    return ScriptSpec(parsed, float(start_at) if start_at is not None else None)
