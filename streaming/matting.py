"""The person matte of a portrait photo, once per avatar, and how it follows the head in each frame.

Which model: none of the segmentation models that the registries ship inside a package fits (docs/framing.md):
mediapipe's selfie segmenter is inside the wheels of mediapipe 0.10.x only (the legacy `solutions` API), and those
pin protobuf < 5 and numpy < 2 (ours: protobuf 6, numpy 2); mediapipe 1.x has the tasks API but no model in its
wheel (a .tflite must be downloaded); rembg, backgroundremover, snipbg and the like download their weights at run
time. So the matte is computed here from the photo itself, once: GrabCut (OpenCV) seeded from where the crop box
says the face and the body are, then a colour-guided filter (He et al.) that snaps the edge to the photo's own
edges and softens it over a pixel or two. The body and the background do not move in a V-Express stream; only the
head moves inside the crop, so per frame the matte's head part is moved with the head (`head_motion` of the key
points, weighted by `head_weight`), which costs one small warp instead of a segmentation per frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from .portrait import DEFAULT_SCALE, FACE_CENTRE_HEIGHT, face_box_from_kps

GRABCUT_SIDE = 320  # GrabCut runs on the photo shrunk to this longer side (its cost grows with the pixels)
GRABCUT_ITERATIONS = 4
GUIDE_SIDE = 1024  # the guided filter runs at most this large; the matte is then resized to the photo
GUIDE_RADIUS = 0.004  # the guided filter's window radius, as a fraction of the longer side (4 px at 1024)
GUIDE_EPS = 1e-3  # its regulariser: lower follows the photo's edges more closely
SOLID = 0.1  # matte values within this of 0 or 1 are made exactly 0 or 1 (flat regions stay flat)


def _face_geometry(box: tuple[float, float, float, float]) -> tuple[float, float, float]:
    """(face centre x, y, face size) in the photo from the crop box (`streaming.portrait.crop_box`'s framing)."""
    x0, y0, x1, y1 = box
    face = min(x1 - x0, y1 - y0) / DEFAULT_SCALE
    return (x0 + x1) / 2, y0 + FACE_CENTRE_HEIGHT * (y1 - y0), face


def _seeds(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """GrabCut's starting labels: sure background along the top and the sides above the shoulders, sure person in
    the middle of the face and the chest, probable person over the head and a widening body, probable background
    elsewhere."""
    h, w = shape
    cx, cy, f = _face_geometry(box)
    mask = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
    edge = max(2, round(0.02 * max(h, w)))
    shoulders = int(min(h, max(0, cy + 1.2 * f)))
    mask[:edge] = cv2.GC_BGD
    mask[:shoulders, :edge] = cv2.GC_BGD
    mask[:shoulders, w - edge :] = cv2.GC_BGD
    # probable person: the head (hair included) and the body below it, widening to the shoulders
    cv2.ellipse(mask, (round(cx), round(cy - 0.15 * f)), (round(0.8 * f), round(1.0 * f)), 0, 0, 360, cv2.GC_PR_FGD, -1)
    body = np.array(
        [
            [cx - 0.45 * f, cy + 0.5 * f],
            [cx + 0.45 * f, cy + 0.5 * f],
            [cx + 1.7 * f, cy + 1.5 * f],
            [cx + 2.2 * f, h + 1.0],
            [cx - 2.2 * f, h + 1.0],
            [cx - 1.7 * f, cy + 1.5 * f],
        ],
        np.float64,
    )
    cv2.fillPoly(mask, [np.round(body).astype(np.int32)], cv2.GC_PR_FGD)
    # sure person: the middle of the face, and of the neck and chest
    cv2.ellipse(mask, (round(cx), round(cy)), (round(0.3 * f), round(0.4 * f)), 0, 0, 360, cv2.GC_FGD, -1)
    chest = np.array(
        [
            [cx - 0.2 * f, cy + 0.5 * f],
            [cx + 0.2 * f, cy + 0.5 * f],
            [cx + 0.5 * f, cy + 1.6 * f],
            [cx - 0.5 * f, cy + 1.6 * f],
        ]
    )
    cv2.fillPoly(mask, [np.round(chest).astype(np.int32)], cv2.GC_FGD)
    return mask


def _largest_part(person: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The connected part of `person` holding `seed` (else the largest), its holes filled."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(person.astype(np.uint8), connectivity=8)
    if count <= 1:
        return person
    x, y = seed
    label = labels[min(max(y, 0), labels.shape[0] - 1), min(max(x, 0), labels.shape[1] - 1)]
    if label == 0:
        label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    part = labels == label
    # holes: background parts that do not touch the image border
    count, holes, _, _ = cv2.connectedComponentsWithStats((~part).astype(np.uint8), connectivity=4)
    border = set(np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])).tolist())
    filled = part | ~np.isin(holes, list(border))
    result: np.ndarray = filled
    return result


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour guide: `source` (float32 (H, W)) smoothed so that its edges follow
    `guide`'s (float32 (H, W, 3) in [0, 1])."""

    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT)

    mean_i = mean(guide)
    mean_p = mean(source)
    cov_ip = mean(guide * source[:, :, None]) - mean_i * mean_p[:, :, None]
    var = np.empty(guide.shape[:2] + (3, 3), np.float32)
    for a in range(3):
        for b in range(a, 3):
            v = mean(guide[:, :, a] * guide[:, :, b]) - mean_i[:, :, a] * mean_i[:, :, b]
            var[:, :, a, b] = var[:, :, b, a] = v
    var += eps * np.eye(3, dtype=np.float32)
    coef = np.linalg.solve(var, cov_ip[:, :, :, None])[:, :, :, 0]
    offset = mean_p - (coef * mean_i).sum(axis=2)
    smoothed: np.ndarray = (mean(coef) * guide).sum(axis=2) + mean(offset)
    return smoothed


def portrait_matte(pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """float32 (H, W) in [0, 1]: the person in the RGB photo `pixels`, whose face crop box is `box` (photo
    pixels). Deterministic (GrabCut's GMMs are seeded by OpenCV's fixed RNG)."""
    h, w = pixels.shape[:2]
    small = min(1.0, GRABCUT_SIDE / max(h, w))
    sw, sh = max(1, round(w * small)), max(1, round(h * small))
    image = cv2.resize(pixels, (sw, sh), interpolation=cv2.INTER_AREA) if small < 1.0 else pixels
    fx, fy = sw / w, sh / h
    mask = _seeds((sh, sw), (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy))
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    background_seeds = np.isin(mask, (cv2.GC_BGD, cv2.GC_PR_BGD)).any()
    person_seeds = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).any()
    if background_seeds and person_seeds:  # else (the crop fills the photo) the seeds are all there is to go on
        cv2.setRNGSeed(0)
        cv2.grabCut(
            np.ascontiguousarray(image[:, :, ::-1]),
            mask,
            (0, 0, 0, 0),
            bgd,
            fgd,
            GRABCUT_ITERATIONS,
            cv2.GC_INIT_WITH_MASK,
        )
    person = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    cx, cy, _ = _face_geometry((box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy))
    person = _largest_part(person, (round(cx), round(cy)))
    # the edge: refined by the guided filter at up to GUIDE_SIDE, then resized to the photo
    guide_scale = min(1.0, GUIDE_SIDE / max(h, w))
    gw, gh = max(1, round(w * guide_scale)), max(1, round(h * guide_scale))
    guide = cv2.resize(pixels, (gw, gh), interpolation=cv2.INTER_AREA) if guide_scale < 1.0 else pixels
    hard = cv2.resize(person.astype(np.float32), (gw, gh), interpolation=cv2.INTER_LINEAR)
    radius = max(2, round(GUIDE_RADIUS * max(gw, gh)))
    soft = guided_filter(guide.astype(np.float32) / 255.0, hard, radius, GUIDE_EPS)
    if (gw, gh) != (w, h):
        soft = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
    soft = np.clip((soft - SOLID) / (1.0 - 2.0 * SOLID), 0.0, 1.0)
    return soft.astype(np.float32)


def head_motion(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """The similarity transform (2 x 3: rotation, uniform scale, shift) taking the reference key points (eyes,
    nose) onto the current ones, in the least-squares sense (Umeyama, without reflection)."""
    src = np.asarray(reference, np.float64)[:3]
    dst = np.asarray(current, np.float64)[:3]
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - ms, dst - md
    var = float((a**2).sum())
    if var < 1e-9:
        return np.array([[1.0, 0.0, md[0] - ms[0]], [0.0, 1.0, md[1] - ms[1]]])
    cos = float((a * b).sum()) / var
    sin = float((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum()) / var
    rot = np.array([[cos, -sin], [sin, cos]])
    shift = md - rot @ ms
    return np.hstack([rot, shift[:, None]])


def head_weight(reference_kps: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """float32 (h, w) of the crop: 1 over the head (an ellipse around the face, hair included), falling smoothly
    to 0 by the neck: how much of the matte moves with the head."""
    x0, y0, x1, y1 = face_box_from_kps(reference_kps)
    size, cx, cy = x1 - x0, (x0 + x1) / 2, (y0 + y1) / 2
    w, h = crop_size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    # the head: crown about 0.9 face boxes above the face's centre, chin about 0.55 below, 1.3 boxes wide
    r = np.sqrt(((xs - cx) / (0.65 * size)) ** 2 + ((ys - (cy - 0.15 * size)) / (0.75 * size)) ** 2)
    t = np.clip((1.3 - r) / 0.3, 0.0, 1.0)
    weight: np.ndarray = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
    return weight
