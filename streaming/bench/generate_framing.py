"""`python -m streaming.bench.generate_framing`: what `generate --framing --background` adds per frame, the model
aside: the composition (`FramingAddition`'s `FrameComposer`) and the encoding of the framed frames (`write_video`:
H.264 in MP4, VP9 with alpha in WebM), for a 512x512 crop of a 1920x1080 photo (scikit-image's astronaut), the
head moved a little (so the matte's head part is warped each frame, as in a generated video). Also the one-time
cost per video: finding the face, cropping, the matte.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.data import astronaut

from vexpress_rt.media import write_video

from ..framing import parse_background, parse_framing
from ..generate_additions import FRAMING_ADDITION

CASES = (
    ("1280x720", "photo", ".mp4"),
    ("1280x720", "#00b140", ".mp4"),
    ("1280x720", "transparent", ".webm"),
    ("1920x1080", "photo", ".mp4"),
    ("1920x1080", "#00b140", ".mp4"),
    ("1920x1080", "transparent", ".webm"),
)


def measure(folder: Path, frames: int, size: int) -> list[dict[str, object]]:
    big = Image.fromarray(astronaut()).resize((1920, 1920), Image.Resampling.LANCZOS)
    photo = folder / "photo.png"
    big.crop((0, 200, 1920, 1280)).save(photo)
    rows = []
    for framing, background, suffix in CASES:
        args = argparse.Namespace(
            framing=parse_framing(framing),
            background=parse_background(background),
            output_path=str(folder / f"out{suffix}"),
            image_width=size,
            image_height=size,
            reference_image_path=str(photo),
            reference_kps_path=None,
        )
        start = time.perf_counter()
        framed = FRAMING_ADDITION.framed_reference(args, folder / "no_insightface")
        assert framed is not None
        once = time.perf_counter() - start
        rng = np.random.default_rng(0)
        crop = np.asarray(framed.image, np.int16)
        crops = [np.clip(crop + rng.integers(-8, 9, crop.shape), 0, 255).astype(np.uint8) for _ in range(frames)]
        kps = framed.kps + np.array([1.5, 0.5])  # the head moved a little
        start = time.perf_counter()
        out = [framed.compose(c, kps) for c in crops]
        compose = (time.perf_counter() - start) / frames
        start = time.perf_counter()
        write_video(args.output_path, iter(out), frames, framed.size, 25, None, framed.alpha)
        encode = (time.perf_counter() - start) / frames
        rows.append(
            {"framing": framing, "background": background, "file": suffix, "once_s": round(once, 2)}
            | {"compose_ms": round(1000 * compose, 1), "encode_ms": round(1000 * encode, 1)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=512, help="the crop's side (the model's image size)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(Path(folder), args.frames, args.size)
    print("| output | background | file | compose ms/frame | encode ms/frame | once (face, crop, matte) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['framing']} | `{r['background']}` | {r['file']} | {r['compose_ms']} | {r['encode_ms']} "
            f"| {r['once_s']} s |"
        )


if __name__ == "__main__":
    main()
