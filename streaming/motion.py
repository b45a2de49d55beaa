"""Head motion as key-point trajectories: the pose source of a frame, offline (`generate --motion`) and live.

A `MotionTrack` gives the 3 V-Kps points (eye, eye, nose; pixels) of any frame number, looping forever without a
jump. Two kinds:

* procedural (`still`, `subtle`, `nod`, `sway`, `lively`): the portrait's own points moved by a few sine waves
  (roll, yaw, pitch, sideways and vertical shifts) whose periods divide one loop, with phases drawn from a seed;
  the table of one loop is computed once, so frame L is frame 0 and the step L-1 -> L is an ordinary step;
* a key-point sequence (a `kps.pth` from `extract-kps`), retargeted to the portrait with the original's strategy
  over its own length (`vexpress_rt.kps.retarget`, unchanged), then played forth and back (ping-pong), as the
  idle clip is.

`amplitude` scales the motion about its first pose (0 holds the first pose, 1 is the motion as made).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vexpress_rt.errors import InputError
from vexpress_rt.kps import retarget
from vexpress_rt.params import FIX_FACE

LOOP_SECONDS = 8.0  # one procedural loop; every wave makes a whole number of cycles in it

# motion -> (component, cycles per loop, amplitude): shifts and yaw/pitch in eye distances, roll in degrees.
# Yaw and pitch move the nose against the eyes (a turned or nodding head seen from the front).
RECIPES: dict[str, tuple[tuple[str, int, float], ...]] = {
    "still": (),
    "subtle": (("yaw", 1, 0.03), ("pitch", 2, 0.025), ("roll", 1, 1.2), ("dy", 3, 0.01)),
    "nod": (("pitch", 4, 0.08), ("dy", 4, 0.03), ("roll", 1, 0.8)),
    "sway": (("roll", 2, 4.0), ("dx", 2, 0.08), ("yaw", 1, 0.02)),
    "lively": (("yaw", 3, 0.07), ("pitch", 5, 0.05), ("roll", 2, 3.0), ("dx", 3, 0.05), ("dy", 4, 0.03)),
}
PROCEDURAL_MOTIONS = tuple(RECIPES)  # the `motion` names besides fix_face and uploaded ids


def _procedural_loop(name: str, reference_kps: np.ndarray, fps: float, seed: int) -> np.ndarray:
    """One loop (L, 3, 2) float32 of procedural motion `name` around `reference_kps` (3, 2)."""
    ref = np.asarray(reference_kps, dtype=np.float64)[:3]
    frames = max(2, round(LOOP_SECONDS * fps))
    t = np.arange(frames) / frames
    rng = np.random.default_rng(seed)
    eye = float(np.hypot(*(ref[0] - ref[1]))) or 1.0
    centre = ref.mean(axis=0)
    wave = {k: np.zeros(frames) for k in ("dx", "dy", "yaw", "pitch", "roll")}
    for component, cycles, amplitude in RECIPES[name]:
        wave[component] += amplitude * np.sin(2 * math.pi * cycles * t + rng.uniform(0, 2 * math.pi))
    roll = np.radians(wave["roll"])
    cos, sin = np.cos(roll)[:, None], np.sin(roll)[:, None]
    offset = ref - centre  # (3, 2)
    points = np.empty((frames, 3, 2))
    points[..., 0] = centre[0] + cos * offset[:, 0] - sin * offset[:, 1]
    points[..., 1] = centre[1] + sin * offset[:, 0] + cos * offset[:, 1]
    points[..., 0] += eye * wave["dx"][:, None]
    points[..., 1] += eye * wave["dy"][:, None]
    points[:, 2, 0] += eye * wave["yaw"]  # the nose leads a turn
    points[:, 2, 1] += eye * wave["pitch"]
    return points.astype(np.float32)


def ping_pong(frames: int, index: int) -> int:
    """Frame `index` of a clip of `frames` played forth and back forever (0, 1, .., n-1, n-2, .., 1, 0, ..)."""
    if frames == 1:
        return 0
    period = 2 * (frames - 1)
    p = index % period
    return p if p < frames else period - p


@dataclass(frozen=True)
class MotionTrack:
    """Key points of every frame: a table played as a loop (procedural) or forth and back (a sequence)."""

    table: np.ndarray  # (L, 3, 2) float32
    bounce: bool  # play forth and back (a sequence's last pose is not its first)

    def points(self, frame: int) -> np.ndarray:
        n = len(self.table)
        points: np.ndarray = self.table[ping_pong(n, frame) if self.bounce else frame % n]
        return points

    def scaled(self, amplitude: float) -> MotionTrack:
        """The motion scaled about its first pose (1: this track, bit for bit)."""
        if amplitude == 1.0:
            return self
        start = self.table[0]
        return MotionTrack((start + np.float32(amplitude) * (self.table - start)).astype(np.float32), self.bounce)


def procedural_track(name: str, reference_kps: np.ndarray, fps: float, seed: int = 0) -> MotionTrack:
    if name not in RECIPES:
        raise InputError(f"unknown procedural motion {name!r}; choose one of {', '.join(PROCEDURAL_MOTIONS)}")
    return MotionTrack(_procedural_loop(name, reference_kps, fps, seed), bounce=False)


def sequence_track(reference_kps: np.ndarray, sequence: np.ndarray, strategy: str) -> MotionTrack:
    """A driving key-point sequence (N, 3, 2) fitted to the portrait by the original's `strategy`."""
    return MotionTrack(retarget(strategy, reference_kps, sequence, len(sequence)), bounce=True)


def fixed_track(reference_kps: np.ndarray) -> MotionTrack:
    """fix_face: the portrait's own points on every frame."""
    return MotionTrack(retarget(FIX_FACE, reference_kps, None, 1), bounce=False)


def motion_sequence(
    motion: str, reference_kps: np.ndarray, frames: int, fps: float, amplitude: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Absolute key points (frames, 3, 2) of a built-in motion: what `generate --motion` drives the video with."""
    if motion == FIX_FACE:
        track = fixed_track(reference_kps)
    else:
        track = procedural_track(motion, reference_kps, fps, seed).scaled(amplitude)
    return np.stack([track.points(i) for i in range(frames)])
