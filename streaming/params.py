"""`GenerationParams`: every knob of a streaming session's generation, with its one default, range and message.

One frozen dataclass, validated when it is made (so a value is checked once, where it enters: the HTTP API, the
`serve` flags, a library call) and read, never re-checked, downstream. The engine keys its denoisers and the UNet
runner's graphs by the shape-relevant part only (`steps`, `strategy`, `new_frames`, `context_frames`, and whether
guidance is on); the attention weights and the guidance scale are per-session values in a batched call.

The model's own knobs (attention weights, guidance, seed, retarget strategy) keep their ranges and the released
weights' defaults in `vexpress_rt/params.py`; this table adds the product's: the sliding window (steps, strategy,
frames per call), the head's motion and the blinks, with the same wording of a bad value. The schedule's defaults
(2 steps x 4 new frames, staggered) were measured on the simulated H100 (docs/streaming.md; presets.py).

`decoder` is not here: it chooses what turns latents into pictures after generation, and which decoders exist
depends on the weights a server loaded (`streaming.decoder`), so the session's config holds it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from vexpress_rt import params as model
from vexpress_rt.errors import InputError
from vexpress_rt.params import FIX_FACE, MAX_WINDOW, shown

from .motion import PROCEDURAL_MOTIONS

STRATEGIES = ("chunked", "staggered")  # how the streaming window slides (streaming/denoiser.py)
MOTION_ID = re.compile(r"m[0-9a-f]{15}")  # an uploaded key-point sequence (POST /v1/motions)

# field -> (kind, low, high); kind: "int", "number", a tuple of choices or "motion". One table: validate() and
# /v1/info. The model's knobs come from vexpress_rt.params.LIMITS.
LIMITS: dict[str, model.Limit] = {
    "steps": ("int", 1, 8),
    "guidance_scale": model.LIMITS["guidance_scale"],
    "reference_attention_weight": model.LIMITS["reference_attention_weight"],
    "audio_attention_weight": model.LIMITS["audio_attention_weight"],
    "strategy": (STRATEGIES, None, None),
    "new_frames": ("int", 1, MAX_WINDOW),
    "context_frames": ("int", 0, MAX_WINDOW - 1),
    "seed": model.LIMITS["seed"],
    "motion": ("motion", None, None),
    "motion_amplitude": ("number", 0.0, 3.0),
    "retarget_strategy": model.LIMITS["retarget_strategy"],
    "blinks_per_minute": ("number", 0.0, 60.0),
}


def field_error(name: str, value: object) -> str | None:
    """The one message for a bad `name` (None when `value` is fine)."""
    kind = LIMITS[name][0]
    if kind == "motion":
        ok = isinstance(value, str) and (value in (FIX_FACE, *PROCEDURAL_MOTIONS) or MOTION_ID.fullmatch(value))
        choices = ", ".join((FIX_FACE, *PROCEDURAL_MOTIONS))
        return None if ok else f"{name} must be one of {choices} or an uploaded motion's id, got {shown(value)}"
    return model.limit_error(name, value, LIMITS[name], model.NOTES.get(name, ""))


def arg_type(name: str) -> Callable[[str], object]:
    """An argparse `type=` for the flag of field `name`, with the field's one message."""
    return model.arg_type(name, field_error, LIMITS[name][0])


def window_frames(strategy: str, steps: int, new_frames: int, context_frames: int) -> int:
    """Frames in one UNet window: chunked = context + new; staggered = one group of new frames per step."""
    if strategy == "chunked":
        return context_frames + new_frames
    return steps * new_frames


@dataclass(frozen=True)
class GenerationParams:
    steps: int = 2  # DDIM steps per frame window (few-step: 1..8); 2: measured, docs/streaming.md
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off (guidance doubles the UNet batch)
    reference_attention_weight: float = model.REFERENCE_ATTENTION_WEIGHT  # the released weights' default
    audio_attention_weight: float = model.AUDIO_ATTENTION_WEIGHT  # "expression strength"; the weights' default
    strategy: str = "staggered"  # measured against "chunked": docs/streaming.md
    new_frames: int = 4  # frames per call: latency (staggered waits steps x new_frames) vs. per-call overhead
    context_frames: int = 4  # chunked: frames already made that each window sees again
    seed: int = 0  # a session's noise: its frames are a function of avatar, audio, params and seed
    motion: str = FIX_FACE  # the head's pose source: fix_face, a procedural motion, or an uploaded motion's id
    motion_amplitude: float = 1.0  # scales the motion about its first pose (0: held there; 1: as made)
    retarget_strategy: str = "offset_retarget"  # how an uploaded key-point sequence is fitted to the portrait
    blinks_per_minute: float = 15.0  # eye blinks drawn over the frames (streaming/blink_schedule.py); 0: none

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InputError with the first bad field's message."""
        for f in fields(self):
            message = field_error(f.name, getattr(self, f.name))
            if message:
                raise InputError(message)
        if self.window_frames > MAX_WINDOW:
            raise InputError(
                f"a window of {self.window_frames} frames ({self.strategy}: "
                + ("context_frames + new_frames" if self.strategy == "chunked" else "steps x new_frames")
                + f") exceeds the motion modules' {MAX_WINDOW}"
            )

    @property
    def window_frames(self) -> int:
        return window_frames(self.strategy, self.steps, self.new_frames, self.context_frames)

    @property
    def cfg(self) -> bool:
        """Guidance on: the UNet batch doubles ([uncond, cond])."""
        return self.guidance_scale > 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: GenerationParams | None = None) -> GenerationParams:
        """`base` (default: the defaults) with the fields of `data` that are not None; unknown keys are the
        caller's to refuse."""
        values = (base or cls()).to_dict()
        values.update({k: v for k, v in data.items() if k in values and v is not None})
        return cls(**values)

    def limits(self) -> dict[str, dict[str, Any]]:
        """Ranges of every field and its default (this instance's value), as `/v1/info` serves them with the
        server's defaults (the page's controls read them)."""
        default = self
        out = {}
        for name, (kind, low, high) in LIMITS.items():
            entry: dict[str, Any] = {"default": getattr(default, name)}
            if kind == "motion":
                entry["choices"] = [FIX_FACE, *PROCEDURAL_MOTIONS]  # and the ids of uploaded motions
            elif isinstance(kind, tuple):
                entry["choices"] = list(kind)
            else:
                entry.update(type="integer" if kind == "int" else "number", min=low, max=high)
            out[name] = entry
        return out


DEFAULTS = GenerationParams()
