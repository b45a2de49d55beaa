"""`python -m streaming.bench.framing`: what presenter framing costs per frame, and how good the person matte is.

Cost: ms per output frame of `FrameComposer.compose` (host, numpy + OpenCV) for a 512x512 crop framed at 512x512
(`crop`, the matte's only), 1280x720 and 1920x1080, with the photo's background (paste-back only) and with a key
colour (paste-back + matte; the head moved, so the per-frame matte warp runs), plus the torch paste (`DevicePaste`)
on the CPU, and, with `--device cuda`, on the GPU (the alternative to the host path: composing before the copy to
the host, docs/framing.md); and the matte's one-time cost per photo. The photo: scikit-image's astronaut made 1920x1080.

Quality: the matte of two real photos (scikit-image's astronaut and cameraman) against person outlines drawn by
hand on them (framing_truth.json beside this file: the person and what they hold; the cameraman's tripod is not
the person): IoU of the matte at 0.5, and the mean edge error (mean distance in pixels from each point of either
outline to the other one). `--picture PATH` writes the astronaut and cameraman over a key colour with the drawn
outline (a small PNG, docs/img/framing.png).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.data import astronaut, camera

from ..framing import DevicePaste, FrameComposer, PortraitPhoto, parse_background, parse_framing
from ..matting import portrait_matte
from ..portrait import crop_box, crop_portrait, detect_face_kps

TRUTH = Path(__file__).resolve().parent / "framing_truth.json"
CROP = (512, 512)
FRAMINGS = ("crop", "1280x720", "1920x1080")
# the cameraman looks sideways, which no frontal face detector finds: his eyes and nose tip, read off the photo
CAMERA_KPS = np.array([[236.0, 147.0], [258.0, 145.0], [250.0, 167.0]], np.float32)


def truth_mask(name: str, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for polygon in json.loads(TRUTH.read_text())[name]:
        cv2.fillPoly(mask, [np.round(np.asarray(polygon) * 8).astype(np.int32)], 1, shift=3)
    return mask.astype(bool)


def edge_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance (pixels) from each boundary pixel of either mask to the other mask's boundary."""

    def boundary(mask: np.ndarray) -> np.ndarray:
        m = mask.astype(np.uint8)
        return (m - cv2.erode(m, np.ones((3, 3), np.uint8))).astype(bool)

    ba, bb = boundary(a), boundary(b)
    da = cv2.distanceTransform((~bb).astype(np.uint8), cv2.DIST_L2, 5)
    db = cv2.distanceTransform((~ba).astype(np.uint8), cv2.DIST_L2, 5)
    return float((da[ba].sum() + db[bb].sum()) / max(1, ba.sum() + bb.sum()))


def quality() -> list[dict[str, object]]:
    rows = []
    for name, pixels, kps in (
        ("astronaut", astronaut(), None),
        ("camera", np.stack([camera()] * 3, axis=-1), CAMERA_KPS),
    ):
        if kps is None:
            kps = detect_face_kps(Image.fromarray(pixels)).kps
        t0 = time.perf_counter()
        matte = portrait_matte(pixels, crop_box(kps, *CROP))
        seconds = time.perf_counter() - t0
        truth = truth_mask(name, pixels.shape[:2])
        person = matte >= 0.5
        iou = float((person & truth).sum() / (person | truth).sum())
        partial = float(((matte > 0) & (matte < 1)).mean())
        rows.append(
            {
                "photo": f"{name} {pixels.shape[1]}x{pixels.shape[0]}",
                "iou": round(iou, 3),
                "edge_error_px": round(edge_error(person, truth), 2),
                "soft_pixels": round(partial, 4),
                "matte_s": round(seconds, 2),
                "matte": matte,
                "pixels": pixels,
                "truth": truth,
            }
        )
    return rows


def presenter() -> tuple[Image.Image, np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """The astronaut as a 1920x1080 presenter photo: (photo, 512x512 crop, crop key points, crop box)."""
    photo = Image.fromarray(astronaut()).resize((1920, 1920), Image.Resampling.LANCZOS).crop((0, 200, 1920, 1280))
    face = detect_face_kps(photo)
    crop, kps = crop_portrait(photo, face, *CROP)
    return photo, np.asarray(crop), kps, crop_box(face.kps, *CROP)


def _synchronised(paste: DevicePaste, batch: torch.Tensor) -> None:
    paste(batch)
    torch.cuda.synchronize(paste.device)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median ms of `repeats` calls (after one warm-up call): robust to a shared machine's stalls."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def cost(repeats: int, device: str | None) -> list[dict[str, object]]:
    photo, crop, kps, box = presenter()
    whole = PortraitPhoto.of(photo, box)
    t0 = time.perf_counter()
    whole.matte()
    matte_s = time.perf_counter() - t0
    moved = kps + np.array([6.0, -3.0], np.float32)  # the head away from the portrait's pose: the matte is warped
    rows = []
    for framing in FRAMINGS:
        row: dict[str, object] = {"framing": framing}
        for key, background in (("paste_ms", "photo"), ("matte_ms", "#00b140"), ("transparent_ms", "transparent")):
            c = FrameComposer(whole, parse_framing(framing), parse_background(background), CROP, kps)
            row[key] = round(timed(partial(c.compose, crop, moved), repeats), 2)
        paste = FrameComposer(whole, parse_framing(framing), parse_background("photo"), CROP, kps)
        if not paste.identity:
            batch = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255.0
            row["torch_cpu_ms"] = round(timed(partial(DevicePaste(paste, "cpu"), batch), repeats), 2)
            if device is not None:
                row[f"torch_{device}_ms"] = round(
                    timed(partial(_synchronised, DevicePaste(paste, device), batch.to(device)), repeats), 3
                )
        rows.append(row)
    rows.append({"framing": "matte once per photo (1920x1080)", "seconds": round(matte_s, 2)})
    return rows


def picture(path: Path, rows: list[dict[str, object]]) -> None:
    """Each photo over a key colour with its matte; the hand-drawn outline in red. Half size, side by side."""
    tiles = []
    for row in rows:
        pixels, matte, truth = row["pixels"], row["matte"], row["truth"]
        assert isinstance(pixels, np.ndarray) and isinstance(matte, np.ndarray) and isinstance(truth, np.ndarray)
        key = np.array([0, 177, 64], np.float32)
        over = (pixels * matte[:, :, None] + key * (1 - matte[:, :, None]) + 0.5).astype(np.uint8)
        contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(over, contours, -1, (255, 0, 0), 1)
        tiles.append(cv2.resize(over, (over.shape[1] * 3 // 5, over.shape[0] * 3 // 5), interpolation=cv2.INTER_AREA))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.hstack(tiles)).quantize(192).save(path, optimize=True)  # a palette: a small file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default=None, help="also time the torch paste on this device (e.g. cuda)")
    parser.add_argument("--picture", default=None, help="write the matte picture (PNG) here")
    parser.add_argument("--no_cost", action="store_true", help="only the matte quality")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.no_cost:
        print("cost per frame (512x512 crop; ms):")
        for row in cost(args.repeats, args.device):
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
    rows = quality()
    print("matte quality against the hand-drawn outlines:")
    for row in rows:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items() if k not in ("matte", "pixels", "truth")))
    if args.picture:
        picture(Path(args.picture), rows)
        print(f"picture: {args.picture}")


if __name__ == "__main__":
    main()
