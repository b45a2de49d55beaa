"""What the product adds to the offline `generate` (the original inference.py has neither): a built-in head motion
(`--motion`, `--motion_amplitude`; motion.py) instead of a key-point file, and blinks drawn over the frames
(`--blinks_per_minute`; blink_schedule.py, eyelid.py). `vexpress-rt generate` has them; the model port's own
`python -m vexpress_rt generate` is the original's arguments only.

The flags take the live controls' ranges and messages (`GenerationParams`); blinks default to none, as the
original's frames have.
"""

from __future__ import annotations

import argparse

import numpy as np

from vexpress_rt.params import FIX_FACE

from .blink_schedule import blink_video
from .motion import PROCEDURAL_MOTIONS, motion_sequence
from .params import DEFAULTS, arg_type


class ProductAdditions:
    """A `vexpress_rt.cli.GenerateAddition`: head motion and blinks."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--motion",
            default=None,
            choices=(FIX_FACE, *PROCEDURAL_MOTIONS),
            help="drive the head with a built-in motion (docs/controls.md) instead of --retarget_strategy/--kps_path",
        )
        parser.add_argument("--motion_amplitude", type=arg_type("motion_amplitude"), default=DEFAULTS.motion_amplitude)
        parser.add_argument(
            "--blinks_per_minute",
            type=arg_type("blinks_per_minute"),
            default=0.0,
            help="draw eye blinks over the frames at this rate (0..60; 0: none, as the original; 15 is natural); "
            "V-Express has no eyelid control, see docs/blink.md",
        )

    def driving_kps(
        self, args: argparse.Namespace, reference_kps: np.ndarray, frames: int, fps: float
    ) -> np.ndarray | None:
        if not args.motion:
            return None
        return motion_sequence(args.motion, reference_kps, frames, fps, args.motion_amplitude, args.seed)

    def finish(self, args: argparse.Namespace, frames: np.ndarray, kps_sequence: np.ndarray, fps: float) -> np.ndarray:
        if not args.blinks_per_minute:
            return frames
        return blink_video(frames, kps_sequence, args.blinks_per_minute, fps, args.seed)


PRODUCT_ADDITIONS = ProductAdditions()
