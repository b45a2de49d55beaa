"""Expression style presets: named bundles of expression strength, reference weight, pose motion and blink rate.

A style is a partial `GenerationParams` (only `STYLE_FIELDS`); a session picks one and may override any field
(`apply`: style over the server's defaults, then the caller's own fields). Built-in styles are below; `serve
--styles FILE` adds or replaces styles from a JSON object {name: {field: value}}, validated when loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from vexpress_rt.errors import InputError
from vexpress_rt.params import shown

from .params import GenerationParams

STYLE_FIELDS = (
    "audio_attention_weight",
    "reference_attention_weight",
    "motion",
    "motion_amplitude",
    "blinks_per_minute",
)
NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")

BUILT_IN: dict[str, dict[str, Any]] = {
    # the released weights' defaults, head pinned
    "neutral": {"audio_attention_weight": 3.0, "reference_attention_weight": 0.95, "motion": "fix_face",
                "motion_amplitude": 1.0, "blinks_per_minute": 15.0},
    # softer mouth and face, slow small head motion, fewer blinks
    "calm": {"audio_attention_weight": 2.0, "reference_attention_weight": 1.0, "motion": "subtle",
             "motion_amplitude": 0.6, "blinks_per_minute": 10.0},
    # stronger expression, a moving head
    "lively": {"audio_attention_weight": 4.0, "reference_attention_weight": 0.9, "motion": "lively",
               "motion_amplitude": 1.0, "blinks_per_minute": 20.0},
    # a speaker addressing the camera: clear mouth, light nodding
    "presenter": {"audio_attention_weight": 3.5, "reference_attention_weight": 0.95, "motion": "nod",
                  "motion_amplitude": 0.5, "blinks_per_minute": 15.0},
}  # fmt: skip


def check_style(name: object, fields: object) -> dict[str, Any]:
    """A style's fields, validated (names, known fields, each value as GenerationParams checks it)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(f"a style name is 1 to 40 letters, digits, '_' or '-', got {name!r}")
    if not isinstance(fields, dict):
        raise InputError(f"style {name!r} must be an object of fields")
    unknown = set(fields) - set(STYLE_FIELDS)
    if unknown:
        raise InputError(f"style {name!r}: unknown fields {', '.join(sorted(unknown))}; a style sets {STYLE_FIELDS}")
    GenerationParams.from_dict(fields)  # each value's range, with its one message
    return dict(fields)


def load_styles(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The built-in styles, plus (or replaced by) those of the JSON file at `path`."""
    styles = {name: dict(fields) for name, fields in BUILT_IN.items()}
    if path is None:
        return styles
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the styles file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the styles file must be a JSON object {{name: {{field: value}}}}")
    styles.update({name: check_style(name, fields) for name, fields in data.items()})
    return styles


def apply(styles: dict[str, dict[str, Any]], style: object, base: GenerationParams) -> GenerationParams:
    """`base` with style `style`'s fields (None: `base` unchanged)."""
    if style is None:
        return base
    if not isinstance(style, str) or style not in styles:
        raise InputError(f"style must be one of {', '.join(styles)}, got {shown(style)}")
    return replace(base, **styles[style])
