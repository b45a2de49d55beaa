"""`GenerationParams`: every knob of how frames are generated, with its one default, range and error message.

One frozen dataclass, validated when it is made (so a value is checked once, where it enters: the HTTP API, the
`serve` flags, a library call) and read, never re-checked, downstream. The streaming engine keys its denoisers
and the UNet runner's graphs by the shape-relevant part only (`steps`, `strategy`, `new_frames`,
`context_frames`, and whether guidance is on); the attention weights and the guidance scale are per-session
values in a batched call.

`decoder` is not here: it chooses what turns latents into pictures after generation, and which decoders exist
depends on the weights a server loaded (`streaming.decoder`), so the session's config holds it.

The offline `generate` (the original inference.py) shares the weights' defaults; its step count, guidance and
seed stay the original's (25 steps, guidance 3.5, seed 42).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from .errors import InputError

STRATEGIES = ("chunked", "staggered")  # how the streaming window slides (streaming/denoiser.py)
MAX_WINDOW = 32  # frames in one UNet window: the motion modules' positional table
FIX_FACE = "fix_face"  # the pose source that pins the head to the portrait's key points
PROCEDURAL_MOTIONS = ("still", "subtle", "nod", "sway", "lively")  # vexpress_rt/motion.py
# How a key-point sequence is fitted to the portrait (vexpress_rt/kps.py: the original's strategies).
RETARGETS = ("fix_face", "offset_retarget", "naive_retarget", "no_retarget")
MOTION_ID = re.compile(r"m[0-9a-f]{15}")  # an uploaded key-point sequence (POST /v1/motions)

# field -> (kind, low, high); kind: "int", "number" or a tuple of choices. One table: validate() and /v1/info.
LIMITS: dict[str, tuple] = {
    "steps": ("int", 1, 8),
    "guidance_scale": ("number", 1.0, 20.0),
    "reference_attention_weight": ("number", 0.0, 10.0),
    "audio_attention_weight": ("number", 0.0, 10.0),
    "strategy": (STRATEGIES, None, None),
    "new_frames": ("int", 1, MAX_WINDOW),
    "context_frames": ("int", 0, MAX_WINDOW - 1),
    "seed": ("int", 0, 2**63 - 1),
    "motion": ("motion", None, None),
    "motion_amplitude": ("number", 0.0, 3.0),
    "retarget_strategy": (RETARGETS, None, None),
    "blinks_per_minute": ("number", 0.0, 60.0),
}
NOTES = {
    "guidance_scale": " (1 = off)",
    "audio_attention_weight": ' ("expression strength")',
}


def field_error(name: str, value: object) -> str | None:
    """The one message for a bad `name` (None when `value` is fine): integers are not booleans, numbers are
    finite, each field has its range."""
    kind, low, high = LIMITS[name]
    note = NOTES.get(name, "")
    if kind == "motion":
        ok = isinstance(value, str) and (value in (FIX_FACE, *PROCEDURAL_MOTIONS) or MOTION_ID.fullmatch(value))
        choices = ", ".join((FIX_FACE, *PROCEDURAL_MOTIONS))
        return None if ok else f"{name} must be one of {choices} or an uploaded motion's id, got {shown(value)}"
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


def shown(value: object) -> str:
    """A client's value as an error message may echo it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def window_frames(strategy: str, steps: int, new_frames: int, context_frames: int) -> int:
    """Frames in one UNet window: chunked = context + new; staggered = one group of new frames per step."""
    if strategy == "chunked":
        return context_frames + new_frames
    return steps * new_frames


@dataclass(frozen=True)
class GenerationParams:
    steps: int = 2  # DDIM steps per frame window (few-step: 1..8); 2: measured, docs/streaming.md
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off (guidance doubles the UNet batch)
    reference_attention_weight: float = 0.95  # the released weights' default (inference.py)
    audio_attention_weight: float = 3.0  # "expression strength"; the released weights' default (inference.py)
    strategy: str = "staggered"  # measured against "chunked": docs/streaming.md
    new_frames: int = 4  # frames per call: latency (staggered waits steps x new_frames) vs. per-call overhead
    context_frames: int = 4  # chunked: frames already made that each window sees again
    seed: int = 0  # a session's noise: its frames are a function of avatar, audio, params and seed
    motion: str = FIX_FACE  # the head's pose source: fix_face, a procedural motion, or an uploaded motion's id
    motion_amplitude: float = 1.0  # scales the motion about its first pose (0: held there; 1: as made)
    retarget_strategy: str = "offset_retarget"  # how an uploaded key-point sequence is fitted to the portrait
    blinks_per_minute: float = 15.0  # eye blinks added to the frames (streaming/blink.py); 0: none

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, base: GenerationParams | None = None) -> GenerationParams:
        """`base` (default: the defaults) with the fields of `data` that are not None; unknown keys are the
        caller's to refuse."""
        values = (base or cls()).to_dict()
        values.update({k: v for k, v in data.items() if k in values and v is not None})
        return cls(**values)

    def limits(self) -> dict:
        """Ranges of every field and its default (this instance's value), as `/v1/info` serves them with the
        server's defaults (the page's controls read them)."""
        default = self
        out = {}
        for name, (kind, low, high) in LIMITS.items():
            entry: dict = {"default": getattr(default, name)}
            if kind == "motion":
                entry["choices"] = [FIX_FACE, *PROCEDURAL_MOTIONS]  # and the ids of uploaded motions
            elif isinstance(kind, tuple):
                entry["choices"] = list(kind)
            else:
                entry.update(type="integer" if kind == "int" else "number", min=low, max=high)
            out[name] = entry
        return out


DEFAULTS = GenerationParams()


def arg_type(name: str) -> Callable[[str], object]:
    """An argparse `type=` for the flag of field `name`: a bad value fails at argument parsing (exit code 2)
    with the field's one message, the one the HTTP API answers."""
    kind = LIMITS[name][0]

    def parse(text: str) -> object:
        value: object = text
        try:
            if kind == "int":
                value = int(text)
            elif kind == "number":
                value = float(text)
        except ValueError:
            pass  # the message below says what is expected
        message = field_error(name, value)
        if message:
            raise argparse.ArgumentTypeError(message)
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse
