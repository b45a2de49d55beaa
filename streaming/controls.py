"""A session's live controls: expression strength, reference weight, pose source and amplitude, blink rate.

`LiveControls` holds the session's current `GenerationParams` and turns them, frame by frame, into what the
denoiser hands the UNet for that frame: the attention weights and the pose (3 V-Kps points, whose guider feature
the engine computes and caches, `streaming/pose.py`). A change (`change`) is validated, numbered, and takes
effect on the next frame generated, ramped over `RAMP_FRAMES` frames: weights and points are blended from the
values before the change, so the face does not jump. Each frame carries the number of the last change it was
made with; the session acknowledges a change when its first frame plays (`control.applied`).

The blink rate is drawn at output, not generated: `blinks` (the session's blink schedule) is held here with the
other controls and follows `blinks_per_minute` from the next frame shown; the playout draws it (`blinks.apply`).

Fields that fix the denoiser's shapes (steps, strategy, window) and the seed cannot change live.

Threads: `change` comes from the server's event loop, `next_frames` from the model worker; one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from vexpress_rt.errors import InputError
from vexpress_rt.params import FIX_FACE

from .blink_schedule import SessionBlinker
from .device import device_values
from .motion import MotionTrack, fixed_track, procedural_track, sequence_track
from .params import MOTION_ID, GenerationParams

RAMP_FRAMES = 6  # a live change blends in over this many frames (0.24 s at 25 fps)
POSE_FADE_FRAMES = 8  # speech starting from the (fix_face) idle clip moves into the motion over this many frames
UNET_WEIGHTS = ("reference_attention_weight", "audio_attention_weight")  # fields the UNet takes per frame
POSE = "kps_features"  # the UNet's per-frame pose input
LIVE_FIELDS = frozenset(
    {*UNET_WEIGHTS, "motion", "motion_amplitude", "retarget_strategy", "blinks_per_minute", "guidance_scale"}
)

MotionLookup = Callable[[str], np.ndarray]  # an uploaded motion's key-point sequence by id (KeyError: unknown)


def frame_rows(weights: list[dict[str, float]], pose: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's per-frame inputs of F frames: each weight as float32 (F,), the pose features (F, C0, h, w);
    on the pose's device (the model's)."""
    # made on the device, without waiting for it (streaming/device.py)
    rows = {name: device_values([w[name] for w in weights], pose.device) for name in UNET_WEIGHTS}
    rows[POSE] = pose
    return rows


def constant_rows(params: GenerationParams, kps_feature: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
    """F frames with `params`' weights and one pose feature (1, C0, 1, h, w): a fixed face (idle clip, warm-up)."""
    pose = kps_feature[0, :, 0].expand(frames, -1, -1, -1)
    return frame_rows([{name: getattr(params, name) for name in UNET_WEIGHTS}] * frames, pose)


@dataclass(frozen=True)
class FrameControl:
    """The controls of one generated frame."""

    weights: dict[str, float]  # the UNet's attention weights of this frame (ramped)
    kps: np.ndarray  # (3, 2) float32 pixels: the pose it is generated with
    version: int  # the last change it includes (0: the session's initial controls)


@dataclass(frozen=True)
class ControlChange:
    version: int
    params: GenerationParams  # the controls once the change is complete


def track_for(params: GenerationParams, reference_kps: np.ndarray, fps: float, motions: MotionLookup) -> MotionTrack:
    """The pose source `params` name: fix_face, a procedural motion, or an uploaded sequence, amplitude applied."""
    if params.motion == FIX_FACE:
        return fixed_track(reference_kps)
    if MOTION_ID.fullmatch(params.motion):
        try:
            sequence = motions(params.motion)
        except KeyError:
            raise InputError(f"no motion {params.motion!r}: upload it with POST /v1/motions") from None
        track = sequence_track(reference_kps, sequence, params.retarget_strategy)
    else:
        track = procedural_track(params.motion, reference_kps, fps, params.seed)
    return track.scaled(params.motion_amplitude)


class LiveControls:
    def __init__(self, params: GenerationParams, reference_kps: np.ndarray, fps: float, motions: MotionLookup):
        self._reference_kps = np.asarray(reference_kps, dtype=np.float32)[:3]
        self._fps = fps
        self._motions = motions
        self._lock = threading.Lock()
        self._params = params
        self._held: dict[str, np.ndarray] = {}  # the uploaded motion followed now, by id
        self._track = track_for(params, self._reference_kps, fps, self._holding_lookup(self._held))
        self._track_posed = self._is_posed(self._track)
        self._before: tuple[GenerationParams, MotionTrack] | None = None  # what a ramp blends from
        self._ramp_start = 0
        self._version = 0
        self._frame = 0  # frames generated so far: the motion's clock
        self._fade_start: int | None = None
        self.blinks = SessionBlinker(fps, params.seed, params.blinks_per_minute)  # drawn over each frame shown

    @property
    def params(self) -> GenerationParams:
        """The controls as last changed (the end of any ramp in progress)."""
        return self._params

    @property
    def version(self) -> int:
        return self._version

    def change(self, changes: dict[str, Any]) -> ControlChange:
        """Apply `changes` (field -> value; validated as every GenerationParams) from the next frame on."""
        fixed = set(changes) - LIVE_FIELDS
        if fixed:
            raise InputError(f"cannot change {', '.join(sorted(fixed))} during a session; live: {_live()}")
        with self._lock:
            params = replace(self._params, **changes)  # validates
            if params.cfg != self._params.cfg:
                raise InputError("guidance_scale cannot turn guidance on or off during a session (the batch shape)")
            held: dict[str, np.ndarray] = {}
            track = track_for(params, self._reference_kps, self._fps, self._holding_lookup(held))
            # Blend from where the frames are: the old motion goes on, or a ramp in progress is held where it is.
            ramping = self._ramp(self._frame) < 1.0
            old_track = self._blend_track(self._frame) if ramping else self._track
            self._before = (self._blend_params(self._frame), old_track)
            old = self._params
            self._params, self._track, self._held = params, track, held
            self._track_posed = self._is_posed(track)
            self._ramp_start = self._frame
            self._version += 1
            if params.blinks_per_minute != old.blinks_per_minute:
                self.blinks.set_rate(params.blinks_per_minute)  # from the next frame shown
            return ControlChange(self._version, params)

    def _holding_lookup(self, held: dict[str, np.ndarray]) -> MotionLookup:
        """The motion lookup for a new track, noting into `held` what it returned. The motion this session follows
        is kept here (ids name content), so one deleted or evicted from the server goes on for this session, through
        other control changes, until `motion` names another."""

        def lookup(motion_id: str) -> np.ndarray:
            held[motion_id] = self._held[motion_id] if motion_id in self._held else self._motions(motion_id)
            return held[motion_id]

        return lookup

    def start_from_rest(self) -> None:
        """Generation starts from the idle clip (the portrait's own pose): fade from it into the motion."""
        with self._lock:
            self._fade_start = self._frame

    @property
    def posed(self) -> bool:
        """Whether the next frames' pose is other than the portrait's own (fix_face): then idle frames must be
        generated live to follow it, the pre-rendered idle clip cannot. True through a ramp or a fade."""
        with self._lock:
            return self._track_posed or self._ramp(self._frame) < 1.0 or self._fade_start is not None

    def _is_posed(self, track: MotionTrack) -> bool:
        """Whether any frame of `track` leaves the portrait's own points (checked once per change, not per turn)."""
        return not bool(np.all(track.table == self._reference_kps[None]))

    def next_frames(self, count: int) -> list[FrameControl]:
        """The controls of the next `count` frames generated (the worker's call, once per chunk)."""
        with self._lock:
            out = []
            for _ in range(count):
                params, kps = self._blend_params(self._frame), self._pose(self._frame)
                weights = {name: float(getattr(params, name)) for name in UNET_WEIGHTS}
                out.append(FrameControl(weights, kps, self._version))
                self._frame += 1
            return out

    # -- ramps (under the lock) ---------------------------------------------------------------------------------
    def _ramp(self, frame: int) -> float:
        """How far frame `frame` is into the last change: 1/RAMP_FRAMES on its first frame, 1 when done."""
        if self._before is None:
            return 1.0
        return min(1.0, (frame - self._ramp_start + 1) / RAMP_FRAMES)

    def _blend_params(self, frame: int) -> GenerationParams:
        w = self._ramp(frame)
        if w >= 1.0 or self._before is None:
            return self._params
        old = self._before[0]
        return replace(
            self._params,
            **{name: (1 - w) * getattr(old, name) + w * getattr(self._params, name) for name in UNET_WEIGHTS},
        )

    def _blend_track(self, frame: int) -> MotionTrack:
        """The track as a one-frame table at `frame` (a ramp's start point for the next change)."""
        return MotionTrack(self._points(frame)[None], bounce=False)

    def _points(self, frame: int) -> np.ndarray:
        w = self._ramp(frame)
        new = self._track.points(frame)
        if w >= 1.0 or self._before is None:
            return new
        old = self._before[1].points(frame)
        return ((1 - w) * old + w * new).astype(np.float32)

    def _pose(self, frame: int) -> np.ndarray:
        points = self._points(frame)
        if self._fade_start is None:
            return points
        w = (frame - self._fade_start + 1) / (POSE_FADE_FRAMES + 1)
        if w >= 1.0:
            self._fade_start = None
            return points
        return ((1 - w) * self._reference_kps + w * points).astype(np.float32)


def _live() -> str:
    return ", ".join(sorted(LIVE_FIELDS))
