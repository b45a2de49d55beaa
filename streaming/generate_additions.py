"""What the product adds to the offline `generate` (the original inference.py has none of it): a built-in head
motion (`--motion`, `--motion_amplitude`; motion.py) instead of a key-point file, blinks drawn over the frames
(`--blinks_per_minute`; blink_schedule.py, eyelid.py), and presenter framing (`--framing`, `--background`;
framing.py, docs/framing.md "Offline"). `vexpress-rt generate` has them; the model port's own
`python -m vexpress_rt generate` is the original's arguments only.

The flags take the live sessions' values, ranges and messages (`GenerationParams`, `parse_framing`,
`parse_background`); blinks default to none and framing to the crop as generated, as the original's frames are.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vexpress_rt.cli import FramedReference
from vexpress_rt.errors import InputError
from vexpress_rt.kps import load_reference_kps
from vexpress_rt.media import ALPHA_FORMATS
from vexpress_rt.params import FIX_FACE

from .blink_schedule import blink_video
from .framing import (
    Background,
    FrameComposer,
    Framing,
    PortraitPhoto,
    parse_background_or_file,
    parse_framing,
)
from .motion import PROCEDURAL_MOTIONS, motion_sequence
from .params import DEFAULTS, arg_type
from .portrait import crop_box, crop_portrait, locate_face


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

    def framed_reference(self, args: argparse.Namespace, insightface_root: Path) -> FramedReference | None:
        return None

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


def _option(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse `type=` that fails with the parser's own message (exit code 2, the API's words)."""

    def parse_arg(text: str) -> object:
        try:
            return parse(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_arg.__name__ = parse.__name__
    return parse_arg


class FramingAddition:
    """A `vexpress_rt.cli.GenerateAddition`: the output framed in the whole photo, over a background, as the live
    sessions' `framing` and `background` do it (one `FrameComposer`). With either flag the reference image is the
    whole photo: the face is found in it and cropped as for an avatar, and the crop is what the model sees."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--framing",
            type=_option(parse_framing),
            default=Framing(),
            help='"crop" (the crop as generated, the default), "portrait" (the whole photo) or a canvas "WxH" '
            '(e.g. "1280x720"); with it or --background, --reference_image_path is the whole photo and '
            "--reference_kps_path in its pixels (docs/framing.md)",
        )
        parser.add_argument(
            "--background",
            type=_option(parse_background_or_file),
            default=Background(),
            help='"photo" (the default), a colour "#rrggbb", the path of an image file, or "transparent" (needs '
            f"an --output_path ending {' or '.join(ALPHA_FORMATS)}: VP9 or ProRes 4444 with alpha)",
        )

    def framed_reference(self, args: argparse.Namespace, insightface_root: Path) -> FramedReference | None:
        framing: Framing = args.framing
        background: Background = args.background
        if framing.mode == "crop" and background.kind == "photo":
            return None
        transparent = background.kind == "transparent"
        suffix = Path(args.output_path).suffix.lower()
        if transparent and suffix not in ALPHA_FORMATS:
            raise InputError(
                f"--background transparent: a {suffix or 'file without extension'} video cannot carry "
                f"transparency; give an --output_path ending {' or '.join(ALPHA_FORMATS)} (.webm: VP9 with alpha, as "
                "browsers and OBS play it; .mov: ProRes 4444 with alpha, for video editors), or use a key colour, "
                'e.g. --background "#00b140"'
            )
        if not transparent and suffix in ALPHA_FORMATS:
            raise InputError(
                f"--output_path {args.output_path}: {suffix} is written for --background transparent only; "
                "use .mp4 (H.264)"
            )
        width, height = args.image_width, args.image_height
        # the key points, where given, are the face's in the whole photo (pixels of the upright photo)
        given = load_reference_kps(args.reference_kps_path) if args.reference_kps_path else None
        try:
            with Image.open(args.reference_image_path) as photo:
                photo.load()
                upright, face = locate_face(photo, given, insightface_root)  # an upright copy, EXIF applied
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the reference image {args.reference_image_path}: {exc}") from None
        crop, crop_kps = crop_portrait(upright, face, width, height)
        whole = PortraitPhoto.of(upright, crop_box(face.kps, width, height))
        composer = FrameComposer(whole, framing, background, (width, height), crop_kps)

        def compose(frame: np.ndarray, kps: np.ndarray) -> np.ndarray:
            image, alpha = composer.compose(frame, kps)
            if alpha is None:
                return image
            rgba: np.ndarray = np.dstack([image, alpha])
            return rgba

        return FramedReference(crop, crop_kps, composer.size, transparent, compose)

    def driving_kps(
        self, args: argparse.Namespace, reference_kps: np.ndarray, frames: int, fps: float
    ) -> np.ndarray | None:
        return None

    def finish(self, args: argparse.Namespace, frames: np.ndarray, kps_sequence: np.ndarray, fps: float) -> np.ndarray:
        return frames


PRODUCT_ADDITIONS = ProductAdditions()
FRAMING_ADDITION = FramingAddition()
