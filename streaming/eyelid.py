"""An image-space eyelid for V-Express frames: the eyes closed by `closure` (0 open .. 1 shut) on a decoded frame.

V-Express has no eyelid control: its only face geometry is 3 key points (both eye centres, nose tip) and its
output keeps the portrait's eyes open. So blinking is done after decoding, on the frame: inside a small box
around each eye (sized from the eye distance, rotated with the eye line) the skin above the eye is stretched
down over it, like an upper lid sliding down to the lower lid (`close_eyes`). Nothing outside the boxes changes.
When the eyes close is the blink schedule's (`blink_schedule.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# The eyelid, in eye distances d (centre to centre) around an eye centre, along / across the eye line.
EYE_HALF_WIDTH = 0.25  # a measured eye is about 0.40-0.44 d wide: the box reaches past the corners
UPPER_LID = 0.08  # the open upper lid margin above the centre
LOWER_LID = 0.05  # the lower lid margin below the centre: where the closed lid ends
BROW_RANGE = (0.36, 0.14)  # the brow is looked for this far above the centre (its darkest band)
BROW_TO_LID = 0.5  # the skin that slides down starts this far from the brow towards the lid
LASH_WIDTH, LASH_DARKNESS = 0.012, 0.45  # the moving lid margin's lash line
# (Chosen on real photographs by the eye aspect ratio of dlib's landmarks: docs/blink.md, `bench --blink`.)
BOX_TOP = BROW_RANGE[0] - BROW_TO_LID * (BROW_RANGE[0] - UPPER_LID)  # the highest the skin can start


@dataclass(frozen=True)
class EyeBox:
    """Where one eyelid acts: pixel box (x0, y0, x1, y1), exclusive ends."""

    x0: int
    y0: int
    x1: int
    y1: int


def eye_boxes(kps: np.ndarray, width: int, height: int) -> list[EyeBox]:
    """The boxes (clipped to the frame) outside which `close_eyes` changes nothing."""
    return [box for box, _ in _eyes(np.asarray(kps, np.float64), width, height)]


def _eyes(kps: np.ndarray, width: int, height: int) -> list[tuple[EyeBox, tuple[np.ndarray, np.ndarray, float]]]:
    left, right = kps[0], kps[1]
    d = float(np.linalg.norm(right - left))
    if not math.isfinite(d) or d < 4:
        return []
    axis = (right - left) / d  # along the eye line; "down" is axis rotated by +90 degrees in image coordinates
    down = np.array([-axis[1], axis[0]])
    corners_local = np.array(
        [[sx * EYE_HALF_WIDTH * d, sy] for sx in (-1, 1) for sy in (-BOX_TOP * d - 1, LOWER_LID * d + 1)]
    )
    out = []
    for centre in (left, right):
        pts = centre + corners_local[:, :1] * axis + corners_local[:, 1:] * down
        x0, y0 = np.floor(pts.min(0)).astype(int) - 1
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 2
        box = EyeBox(max(0, x0), max(0, y0), min(width, x1), min(height, y1))
        if box.x1 > box.x0 and box.y1 > box.y0:
            out.append((box, (centre, axis, d)))
    return out


def _skin_top(image: np.ndarray, centre: np.ndarray, axis: np.ndarray, d: float) -> float:
    """Where the skin that slides down starts (v, pixels above the eye centre: negative): between the brow and the
    lid. Brows sit at different heights; a fixed height would drag the brow down over the eye on some faces."""
    down = np.array([-axis[1], axis[0]])
    vs = np.arange(-BROW_RANGE[0] * d, -BROW_RANGE[1] * d, 1.0)
    us = np.linspace(-0.6 * EYE_HALF_WIDTH * d, 0.6 * EYE_HALF_WIDTH * d, 9)
    pts = (centre + us[None, :, None] * axis + vs[:, None, None] * down).astype(np.float32)  # (V, U, 2)
    rows = cv2.remap(image, pts[..., 0], pts[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    brow = float(vs[int(np.argmin(rows.astype(np.float32).mean(axis=(1, 2))))])  # the darkest band
    return brow + BROW_TO_LID * (-UPPER_LID * d - brow)


def close_eyes(image: np.ndarray, kps: np.ndarray, closure: float) -> np.ndarray:
    """The frame with both eyes `closure` closed (0: the same array back; 1: shut), uint8 (H, W, 3).

    kps: (>= 2, 2) image-left and image-right eye centres in pixels of this frame. Only pixels inside
    `eye_boxes(kps, W, H)` change."""
    if closure <= 0:
        return image
    closure = min(float(closure), 1.0)
    height, width = image.shape[:2]
    out: np.ndarray = image.copy()
    for box, (centre, axis, d) in _eyes(np.asarray(kps, np.float64)[:2], width, height):
        xs, ys = np.meshgrid(np.arange(box.x0, box.x1, dtype=np.float32), np.arange(box.y0, box.y1, dtype=np.float32))
        # Local coordinates: u along the eye line, v across it (down), in pixels from the eye centre.
        px, py = xs - np.float32(centre[0]), ys - np.float32(centre[1])
        u = px * np.float32(axis[0]) + py * np.float32(axis[1])
        v = -px * np.float32(axis[1]) + py * np.float32(axis[0])
        shape = np.clip(1 - (u / np.float32(EYE_HALF_WIDTH * d)) ** 2, 0, 1)  # the lids' height profile
        top = np.float32(_skin_top(image, centre, axis, d))
        lid = np.float32(-UPPER_LID * d) * shape  # the open upper lid margin
        lower = np.float32(LOWER_LID * d) * shape
        moved = lid + closure * (lower - lid)  # where the upper lid margin is now
        # Between the skin's top and the moved margin, show the skin between its top and the open margin,
        # stretched down (the lid slides over the eye, its lashes at the moved margin); below, the eye as it was.
        covered = (v >= top) & (v < moved) & (shape > 0)
        scale = (lid - top) / np.maximum(moved - top, np.float32(1e-3))
        dv = np.where(covered, (top + (v - top) * scale) - v, np.float32(0))
        map_x, map_y = xs - dv * np.float32(axis[1]), ys + dv * np.float32(axis[0])
        warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        patch = image[box.y0 : box.y1, box.x0 : box.x1]
        result = np.where(covered[..., None], warped, patch).astype(np.float32)
        # The lashes: a thin dark line along the moving margin, fading in as the lid starts to move.
        line = np.exp(-(((v - moved) / np.float32(LASH_WIDTH * d)) ** 2)) * np.sqrt(shape)
        result *= 1 - np.float32(LASH_DARKNESS * min(1.0, 4 * closure)) * line[..., None]
        out[box.y0 : box.y1, box.x0 : box.x1] = np.clip(result + 0.5, 0, 255).astype(np.uint8)
    return out
