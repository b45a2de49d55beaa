"""The model's own knobs, as the original inference.py has them, and the one wording of a knob's bad value.

The released weights' attention weights, the motion modules' window and the key-point retarget strategies belong to
the model; their ranges are checked here with the message every layer gives (`field_error`, `arg_type` for a
flag). The streaming sessions' settings (steps, window, motion, blinks) extend this table in
`streaming/params.py` (`GenerationParams`), with the same wording.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

MAX_WINDOW = 32  # frames in one UNet window: the motion modules' positional table
FIX_FACE = "fix_face"  # the retarget strategy that pins the head to the portrait's key points
# How a key-point sequence is fitted to the portrait (vexpress_rt/kps.py: the original's strategies).
RETARGETS = ("fix_face", "offset_retarget", "naive_retarget", "no_retarget")
REFERENCE_ATTENTION_WEIGHT = 0.95  # the released weights' defaults (inference.py)
AUDIO_ATTENTION_WEIGHT = 3.0  # "expression strength"

Limit = tuple[Any, Any, Any]  # (kind, low, high); kind: "int", "number" or a tuple of choices
# field -> Limit: the model's knobs.
LIMITS: dict[str, Limit] = {
    "guidance_scale": ("number", 1.0, 20.0),
    "reference_attention_weight": ("number", 0.0, 10.0),
    "audio_attention_weight": ("number", 0.0, 10.0),
    "seed": ("int", 0, 2**63 - 1),
    "retarget_strategy": (RETARGETS, None, None),
}
NOTES = {
    "guidance_scale": " (1 = off)",
    "audio_attention_weight": ' ("expression strength")',
}


def limit_error(name: str, value: object, limit: Limit, note: str = "") -> str | None:
    """The one message for a bad `name` against its `limit` (None when `value` is fine): integers are not
    booleans, numbers are finite, each field has its range or choices."""
    kind, low, high = limit
    if isinstance(kind, tuple):
        if value not in kind or not isinstance(value, str):
            return f"{name} must be one of {', '.join(kind)}, got {shown(value)}"
        return None
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"{name}{note} must be an integer from {low} to {high}, got {shown(value)}"
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and low <= value <= high  # before isfinite: no float() of 10**400 (it overflows); NaN fails here
        and math.isfinite(value)
    )
    return None if ok else f"{name}{note} must be a finite number from {low:g} to {high:g}, got {shown(value)}"


def field_error(name: str, value: object) -> str | None:
    """The message for a bad value of the model's knob `name` (None when fine)."""
    return limit_error(name, value, LIMITS[name], NOTES.get(name, ""))


def shown(value: object) -> str:
    """A client's value as an error message may echo it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def arg_type(
    name: str, error: Callable[[str, object], str | None] = field_error, kind: str | None = None
) -> Callable[[str], object]:
    """An argparse `type=` for the flag of field `name`: a bad value fails at argument parsing (exit code 2)
    with the field's one message (`error`: this table's, or a layer's above), the one the HTTP API answers.
    `kind` ("int", "number"; default: this table's) says what the text is parsed as."""
    kind = kind or LIMITS[name][0]

    def parse(text: str) -> object:
        value: object = text
        try:
            if kind == "int":
                value = int(text)
            elif kind == "number":
                value = float(text)
        except ValueError:
            pass  # the message below says what is expected
        message = error(name, value)
        if message:
            raise argparse.ArgumentTypeError(message)
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse
