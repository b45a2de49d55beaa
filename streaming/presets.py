"""Named schedules a session may pick: DDIM steps, new frames per call and wav2vec2 lookahead, together.

A schedule decides a session's latency and its share of the device, so it is chosen by measurement (the engine
bench on the simulated H100: `python -m streaming.bench.schedules`, docs/streaming.md) and picked by name:
`"preset"` in `POST /v1/sessions`, `serve --preset`. `default` is the shipped defaults themselves
(`GenerationParams`, `SessionConfig`), so it cannot drift from them; `low_latency` gives up quality (one step) for
latency (p95 174 ms for one session on the simulated H100, 452 ms for the default).

A preset fixes the denoiser's shapes, so it is chosen when a session opens; the fields a request names besides it
win over its own (as with a style).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vexpress_rt.errors import InputError
from vexpress_rt.params import shown

from .params import DEFAULTS
from .session_config import SessionConfig

SCHEDULE_FIELDS = ("strategy", "steps", "new_frames")  # the GenerationParams fields a preset sets


@dataclass(frozen=True)
class Preset:
    params: dict[str, Any]  # GenerationParams fields (SCHEDULE_FIELDS)
    lookahead_s: float  # SessionConfig.lookahead_s

    def applied(self, config: SessionConfig) -> SessionConfig:
        """`config` on this schedule (validated, as every SessionConfig)."""
        return replace(config, params=replace(config.params, **self.params), lookahead_s=self.lookahead_s)


PRESETS: dict[str, Preset] = {
    "default": Preset({name: getattr(DEFAULTS, name) for name in SCHEDULE_FIELDS}, SessionConfig().lookahead_s),
    "low_latency": Preset({"strategy": "staggered", "steps": 1, "new_frames": 2}, 0.0),
}


def preset_named(name: object) -> Preset:
    """The preset called `name` (InputError with the choices otherwise)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {shown(name)}")
    return PRESETS[name]
