"""Portraits for avatars: find the face and its 3 key points, crop around the face, resize to the model size.

V-Express was trained on tight face crops and conditions on 3 key points (image-left eye, image-right eye, nose
tip) in the pixels of the W x H frame, as insightface's buffalo_l gives them (`kps[:3]`). Users upload any photo,
so the server detects the face, crops a box around it the way training crops look, and maps the key points into
the crop.

Detectors, best first:

* insightface buffalo_l, when its models are under `<insightface_root>/models/buffalo_l` (as the offline
  pipeline uses it). Exactly one face is required, as in the original.
* OpenCV's Haar cascades (frontal face, then eyes in the upper part of the face), when this OpenCV has them.
  OpenCV 5 removed `cv2.CascadeClassifier` and its bundled files from the main package, so with OpenCV >= 5:
* the LBP frontal-face cascade that scikit-image ships (an OpenCV-trained cascade; scikit-image comes with
  insightface), eyes located as the darkest spot (iris and pupil) near where a frontal face has them.

The cascades give false positives (a patch of clothing, a logo), so for them the largest face wins. Where the eyes
are not found they are estimated from the face box with fixed proportions, and the nose tip is always estimated
from the eyes (see `estimate_kps_from_box` and `nose_from_eyes`): good enough for `fix_face`, where the points
only tell the model where the face is.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from vexpress_rt.errors import InputError, WeightsError
from vexpress_rt.kps import FaceDetector, insightface_pack_dir

log = logging.getLogger(__name__)

# The portrait shipped as package data (streaming/assets/): the server's default avatar and the benchmarks' face.
DEFAULT_PORTRAIT = Path(__file__).resolve().parent / "assets" / "default_portrait.png"

MIN_IMAGE_SIDE = 64  # smaller photos cannot show a face with usable detail

# Framing. V-Express's training crops (talking-head video crops) show the head and a little of the neck, with the
# face (cheek to cheek, about 2 eye distances) about 50-60 % of the frame width. The crop's shorter side is
# DEFAULT_SCALE face boxes (face box: FACE_BOX_EYE_DISTANCES eye distances, see face_box_from_kps), i.e.
# 1.6 x 2.3 = 3.7 eye distances, so the face is about 2 / 3.7 = 54 % of it and the eyes are 27 % of it apart.
DEFAULT_SCALE = 1.6
# The face box's centre (midway between the mid-eye point and the nose tip) sits at this fraction of the crop
# height from the top: slightly above the middle, which puts the eyes at about 0.39 and leaves room for the chin.
FACE_CENTRE_HEIGHT = 0.46

# Geometry of a frontal face (used to estimate points and to size boxes):
FACE_BOX_EYE_DISTANCES = 2.3  # face-detector boxes are 2.1-2.3 eye distances wide (Haar, LBP, insightface)
NOSE_BELOW_EYES = 0.57  # nose tip below the mid-eye point, in eye distances (5-point face templates: 0.57)
EYE_X_IN_BOX = (0.28, 0.72)  # eye centres in a cascade's face box, as fractions of its width ...
EYE_Y_IN_BOX = 0.37  # ... and of its height from the top (measured on Haar and LBP boxes)

# Given key points must describe a face, not a line: bounds that no real face in a photo comes near.
MIN_EYE_DISTANCE_PX = 4.0  # eyes closer than this cannot be told apart, whatever the photo
MAX_NOSE_TO_EYES = 6.0  # nose height / expected nose height for the eye distance (a full profile is about 3)
MIN_NOSE_ANGLE_SIN = 0.3  # the nose lies off the eye line (frontal: perpendicular, sin 1)
MAX_CROP_AREA_RATIO = 4.0  # crop box area / photo area (a close-up selfie is about 2)
LANCZOS_SUPPORT = 3  # source pixels Lanczos reads on each side of an output pixel, per unit of downscale

DETECTION_MAX_SIDE = 640  # cascades run on the photo shrunk to at most this size (speed; faces stay > 24 px)

HAAR_FACE = "haarcascade_frontalface_default.xml"
HAAR_EYE = "haarcascade_eye.xml"

_cascade_lock = threading.Lock()  # cascade objects are not documented as thread-safe; detection is rare


@dataclass(frozen=True, eq=False)  # eq=False: kps is an array
class FaceKps:
    """One face: its box and its 3 key points (image-left eye, image-right eye, nose tip) in image pixels."""

    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    kps: np.ndarray  # (3, 2) float32
    detector: str  # "insightface", "opencv" (Haar cascades), "skimage" (LBP cascade) or "given"
    eyes_estimated: bool = False  # True when one or both eyes come from the box proportions, not the picture


# ----------------------------------------------------------------------------------------------------
# Geometry


def nose_from_eyes(left_eye: np.ndarray, right_eye: np.ndarray) -> np.ndarray:
    """Nose tip estimate: NOSE_BELOW_EYES eye distances from the mid-eye point, perpendicular to the eye line.

    Right for an upright frontal face (what the cascades find); rolled faces roll the estimate with them.
    """
    left_eye = np.asarray(left_eye, np.float64)
    right_eye = np.asarray(right_eye, np.float64)
    dx, dy = right_eye - left_eye
    down = np.array([-dy, dx])  # the eye line turned by +90 degrees: points down the face (image y grows down)
    nose: np.ndarray = (left_eye + right_eye) / 2 + NOSE_BELOW_EYES * down
    return nose


def estimate_kps_from_box(bbox: tuple[float, float, float, float]) -> np.ndarray:
    """Key points of an upright frontal face in a cascade face box: eyes at (0.28 | 0.72, 0.37), nose below."""
    x0, y0, x1, y1 = bbox
    w, h = x1 - x0, y1 - y0
    left = np.array([x0 + EYE_X_IN_BOX[0] * w, y0 + EYE_Y_IN_BOX * h])
    right = np.array([x0 + EYE_X_IN_BOX[1] * w, y0 + EYE_Y_IN_BOX * h])
    return np.stack([left, right, nose_from_eyes(left, right)]).astype(np.float32)


def face_box_from_kps(kps: np.ndarray) -> tuple[float, float, float, float]:
    """A square face box from the 3 key points, the size a face detector's box would have.

    Side: FACE_BOX_EYE_DISTANCES x the larger of the eye distance and the eye distance implied by the nose height
    (nose-to-mid-eye distance / NOSE_BELOW_EYES), so a head turned sideways (eyes closer together) or tilted
    up or down (nose closer to the eyes) keeps its size. Centre: midway between the mid-eye point and the nose.
    """
    pts = np.asarray(kps, np.float64)[:3]
    mid_eye = (pts[0] + pts[1]) / 2
    eye_distance = float(np.linalg.norm(pts[1] - pts[0]))
    nose_height = float(np.linalg.norm(pts[2] - mid_eye))
    size = FACE_BOX_EYE_DISTANCES * max(eye_distance, nose_height / NOSE_BELOW_EYES)
    if not math.isfinite(size) or size < 1.0:
        raise InputError("the key points are degenerate: the eyes and the nose (nearly) coincide")
    cx, cy = (mid_eye + pts[2]) / 2
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def crop_box(
    kps: np.ndarray, width: int, height: int, scale: float = DEFAULT_SCALE
) -> tuple[float, float, float, float]:
    """The crop (x0, y0, x1, y1, image pixels, may leave the image) that `crop_portrait` takes around a face.

    Its shorter side is `scale` face boxes (`face_box_from_kps`), its aspect is width / height, the face box is
    centred horizontally and its centre is FACE_CENTRE_HEIGHT of the crop's height from the top.
    """
    if width < 1 or height < 1 or scale <= 0:
        raise ValueError(f"bad crop size {width}x{height} or scale {scale}")
    x0, y0, x1, y1 = face_box_from_kps(kps)
    short = scale * (x1 - x0)
    crop_w, crop_h = (short * width / height, short) if width >= height else (short, short * height / width)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = cx - crop_w / 2, cy - FACE_CENTRE_HEIGHT * crop_h
    return (left, top, left + crop_w, top + crop_h)


# ----------------------------------------------------------------------------------------------------
# Cropping


def crop_portrait(
    image: Image.Image, face: FaceKps, width: int, height: int, scale: float = DEFAULT_SCALE
) -> tuple[Image.Image, np.ndarray]:
    """Crop around the face (see `crop_box`), resize to width x height (Lanczos) and map the key points into it.

    The framing comes from the key points, not from `face.bbox`, so one face is framed the same whichever
    detector found it. Where the crop leaves the photo, the photo's edge pixels are repeated outwards (no black
    bars for the model to copy). Returns the RGB crop and its (3, 2) float32 key points in its pixels.
    """
    rgb = _to_rgb(image)
    left, top, right, bottom = crop_box(face.kps, width, height, scale)
    w, h = rgb.size
    if (right - left) * (bottom - top) > MAX_CROP_AREA_RATIO * w * h:
        raise InputError(
            f"the key points make a face far larger than the {w}x{h} photo (crop {right - left:.0f}x"
            f"{bottom - top:.0f}): give the eyes and nose tip of the face in the photo"
        )
    # Only the part of the photo under the crop (plus what Lanczos reads around it) is padded, never the whole
    # photo, so memory follows the bounded crop box, not the photo times the padding.
    margin = math.ceil(LANCZOS_SUPPORT * max((right - left) / width, (bottom - top) / height, 1.0)) + 2
    x0, y0 = max(0, math.floor(left) - margin), max(0, math.floor(top) - margin)
    x1, y1 = min(w, math.ceil(right) + margin), min(h, math.ceil(bottom) + margin)
    region = rgb.crop((x0, y0, x1, y1))
    pad_left, pad_top = max(0, math.ceil(x0 - left)), max(0, math.ceil(y0 - top))
    pad_right, pad_bottom = max(0, math.ceil(right - x1)), max(0, math.ceil(bottom - y1))
    if pad_left or pad_top or pad_right or pad_bottom:
        pixels = np.pad(np.asarray(region), ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), mode="edge")
        region = Image.fromarray(pixels)
    box = (left - x0 + pad_left, top - y0 + pad_top, right - x0 + pad_left, bottom - y0 + pad_top)
    crop = region.resize((width, height), Image.Resampling.LANCZOS, box=box)
    kps = np.asarray(face.kps, np.float64)[:3]
    mapped = np.stack(
        [(kps[:, 0] - left) * width / (right - left), (kps[:, 1] - top) * height / (bottom - top)], axis=1
    )
    return crop, mapped.astype(np.float32)


def prepare_portrait(
    image: Image.Image,
    width: int,
    height: int,
    kps: np.ndarray | None = None,
    insightface_root: str | Path | None = None,
    scale: float = DEFAULT_SCALE,
) -> tuple[Image.Image, np.ndarray]:
    """An uploaded photo as the avatar's reference: (width x height RGB crop, its (3, 2) float32 key points).

    See `locate_face` for what is done to the photo and how the face is found; the crop is `crop_portrait`'s.
    """
    rgb, face = locate_face(image, kps, insightface_root)
    return crop_portrait(rgb, face, width, height, scale)


def locate_face(
    image: Image.Image, kps: np.ndarray | None = None, insightface_root: str | Path | None = None
) -> tuple[Image.Image, FaceKps]:
    """The upright RGB photo and its face: the photo is first turned upright by its EXIF orientation (as browsers
    show it) and flattened onto grey if it has transparency. `kps` (3 x 2 or 5 x 2: image-left eye, image-right
    eye, nose, ...; pixels of the upright photo) skip detection; otherwise `detect_face_kps` finds the face.
    Photos under MIN_IMAGE_SIDE pixels on a side are refused with InputError.
    """
    rgb = _to_rgb(ImageOps.exif_transpose(image))
    _check_size(rgb)
    if kps is not None:
        points = _check_given_kps(kps, rgb.size)
        return rgb, FaceKps(face_box_from_kps(points), points, "given")
    return rgb, detect_face_kps(rgb, insightface_root)


# ----------------------------------------------------------------------------------------------------
# Detection


def detect_face_kps(image: Image.Image, insightface_root: str | Path | None = None) -> FaceKps:
    """Find the face in a photo and its 3 key points, in the photo's pixels (as given: no EXIF rotation).

    insightface when `<insightface_root>/models/buffalo_l` holds its models (exactly one face required, as in
    the original); otherwise OpenCV's Haar cascades or, without them (OpenCV >= 5), scikit-image's LBP cascade,
    taking the largest face (cascades give false positives). No face: InputError.
    """
    rgb = _to_rgb(image)
    _check_size(rgb)
    if insightface_root is not None and _insightface_models_present(insightface_root):
        try:
            detector = _insightface_detector(str(Path(insightface_root).resolve()))
        except WeightsError as exc:
            log.warning("insightface unusable, falling back to a cascade face detector: %s", exc)
        else:
            count, kps = detector.detect_kps(np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]))
            if count == 0 or kps is None:
                raise InputError(
                    "no face found in the portrait: use a photo where one face is clearly visible, upright and "
                    "facing the camera, or give the key points"
                )
            if count > 1:
                raise InputError(f"there are {count} faces in the portrait; exactly one is required (crop it)")
            return FaceKps(face_box_from_kps(kps), kps, "insightface")
    return _detect_with_cascade(rgb)


def _insightface_models_present(insightface_root: str | Path) -> bool:
    pack = insightface_pack_dir(insightface_root)
    return pack.is_dir() and any(pack.rglob("*.onnx"))


@functools.lru_cache(maxsize=4)
def _insightface_detector(insightface_root: str) -> FaceDetector:
    # Loading the ONNX models takes a second or two: once per process. det_size 640 x 640, insightface's default.
    return FaceDetector(insightface_root, height=640, width=640)


@functools.lru_cache(maxsize=1)
def _haar_cascades() -> tuple[Any, Any] | None:  # (cv2.CascadeClassifier, one or None): cv2 is untyped here
    """OpenCV's frontal-face and eye Haar cascades, or None where this OpenCV has no cascades (OpenCV >= 5)."""
    if not hasattr(cv2, "CascadeClassifier"):
        return None
    try:
        folder = Path(cv2.data.haarcascades)  # type: ignore[attr-defined]  # absent from cv2's stubs
    except AttributeError:
        return None
    if not (folder / HAAR_FACE).is_file():
        return None
    face = cv2.CascadeClassifier(str(folder / HAAR_FACE))
    if face.empty():
        return None
    eye = cv2.CascadeClassifier(str(folder / HAAR_EYE)) if (folder / HAAR_EYE).is_file() else None
    return face, (eye if eye is not None and not eye.empty() else None)


@functools.lru_cache(maxsize=1)
def _lbp_cascade() -> Any:  # skimage.feature.Cascade | None (skimage is untyped)
    try:
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade
    except ImportError:
        return None
    return Cascade(lbp_frontal_face_cascade_filename())


Box = tuple[float, float, float, float]


def _detect_with_cascade(rgb: Image.Image) -> FaceKps:
    gray = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2GRAY)
    factor = min(1.0, DETECTION_MAX_SIDE / max(gray.shape))
    if factor < 1.0:
        gray = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    min_face = max(24, round(0.08 * min(gray.shape)))

    haar = _haar_cascades()
    eye_cascade = None
    with _cascade_lock:
        if haar is not None:
            detector = "opencv"
            face_cascade, eye_cascade = haar
            found = face_cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
            boxes = [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h in found]
        else:
            lbp = _lbp_cascade()
            if lbp is None:
                raise WeightsError(
                    "no face detector available: put insightface's buffalo_l models under "
                    "<model_dir>/insightface_models/models/buffalo_l, install OpenCV 4 (Haar cascades) or "
                    "scikit-image, or give the key points"
                )
            detector = "skimage"
            short = min(gray.shape)
            found = lbp.detect_multi_scale(
                img=gray, scale_factor=1.1, step_ratio=1, min_size=(min_face, min_face), max_size=(short, short)
            )
            boxes = [(d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]) for d in found]
        if not boxes:
            raise InputError(
                "no face found in the portrait: use a photo where one face is clearly visible, upright and facing "
                "the camera, or give the key points"
            )
        if len(boxes) > 1:
            log.info("%s cascade found %d face candidates; taking the largest", detector, len(boxes))
        box = _largest_face(boxes)
        eyes = _find_eyes(gray, box, eye_cascade)

    estimated = eyes[0] is None or eyes[1] is None
    left, right = _complete_eyes(eyes[0], eyes[1], box)
    if not _plausible_eyes(left, right, box):
        guess = estimate_kps_from_box(box)
        left, right, estimated = guess[0].astype(np.float64), guess[1].astype(np.float64), True
    kps = np.stack([left, right, nose_from_eyes(left, right)]) / factor
    return FaceKps(tuple(float(v) / factor for v in box), kps.astype(np.float32), detector, estimated)


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _largest_face(boxes: list[Box]) -> Box:
    """The largest box, averaged with the boxes that overlap it (the LBP cascade reports one face 2-3 times)."""
    largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    group = np.array([b for b in boxes if _iou(b, largest) > 0.3], np.float64)
    return tuple(float(v) for v in group.mean(axis=0))  # type: ignore[return-value]


def _find_eyes(gray: np.ndarray, box: Box, eye_cascade: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(image-left eye, image-right eye) centres, each None where not found: eye cascade, then darkest spot."""
    guess = estimate_kps_from_box(box)
    x0, y0, x1, y1 = box
    w = x1 - x0
    eyes: list[np.ndarray | None] = [None, None]
    if eye_cascade is not None:
        # Eyes are in the upper 55 % of the face box; each side takes the candidate nearest the expected place.
        top, bottom = int(y0), int(y0 + 0.55 * (y1 - y0))
        left, right = int(max(0, x0)), int(x1)
        roi = gray[max(0, top) : bottom, left:right]
        if roi.size:
            size_min, size_max = max(8, round(w / 12)), max(9, round(w / 3))
            found = eye_cascade.detectMultiScale(
                roi, scaleFactor=1.1, minNeighbors=3, minSize=(size_min, size_min), maxSize=(size_max, size_max)
            )
            centres = [np.array([left + ex + ew / 2, max(0, top) + ey + eh / 2]) for ex, ey, ew, eh in found]
            for side in (0, 1):
                near = [c for c in centres if np.linalg.norm(c - guess[side]) < 0.15 * w]
                if near:
                    eyes[side] = min(near, key=lambda c: float(np.linalg.norm(c - guess[side])))
    for side in (0, 1):
        if eyes[side] is None:
            eyes[side] = _darkest_spot(gray, guess[side], w)
    return eyes[0], eyes[1]


def _darkest_spot(gray: np.ndarray, expected: np.ndarray, face_width: float) -> np.ndarray | None:
    """The iris and pupil: the darkest point (after a blur) in a window around where the eye should be.

    The window (+-0.14 x +-0.09 face widths) stops short of the eyebrows. None when the window is flat (no
    dark spot stands out by 12 grey levels from its median): then the proportions are kept.
    """
    half_w, half_h = 0.14 * face_width, 0.09 * face_width
    x0, x1 = int(max(0, expected[0] - half_w)), int(min(gray.shape[1], expected[0] + half_w))
    y0, y1 = int(max(0, expected[1] - half_h)), int(min(gray.shape[0], expected[1] + half_h))
    if x1 - x0 < 3 or y1 - y0 < 3:
        return None
    window = cv2.GaussianBlur(gray[y0:y1, x0:x1].astype(np.float32), (0, 0), max(0.5, face_width / 40))
    iy, ix = np.unravel_index(int(np.argmin(window)), window.shape)
    if float(np.median(window)) - float(window[iy, ix]) < 12.0:
        return None
    return np.array([x0 + ix + 0.5, y0 + iy + 0.5])


def _complete_eyes(left: np.ndarray | None, right: np.ndarray | None, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Both eyes: a missing one mirrored from the found one across the box's vertical mid-line, or the guess."""
    guess = estimate_kps_from_box(box)
    mid_x = (box[0] + box[2]) / 2
    if left is None and right is None:
        return guess[0].astype(np.float64), guess[1].astype(np.float64)
    if left is None:
        assert right is not None
        left = np.array([2 * mid_x - right[0], right[1]])
    elif right is None:
        right = np.array([2 * mid_x - left[0], left[1]])
    return np.asarray(left, np.float64), np.asarray(right, np.float64)


def _plausible_eyes(left: np.ndarray, right: np.ndarray, box: Box) -> bool:
    """Eyes 0.3-0.6 face widths apart, the left one left of the right one, the eye line within about 20 degrees."""
    w = box[2] - box[0]
    dx, dy = right - left
    distance = math.hypot(dx, dy)
    return dx > 0 and 0.3 * w <= distance <= 0.6 * w and abs(dy) <= 0.35 * dx


# ----------------------------------------------------------------------------------------------------
# Input checks


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become mid grey rather than whatever colour they hide."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_size(image: Image.Image) -> None:
    if min(image.size) < MIN_IMAGE_SIDE:
        raise InputError(
            f"the portrait is too small ({image.width}x{image.height}); it must be at least "
            f"{MIN_IMAGE_SIDE} pixels on each side"
        )


def _check_given_kps(kps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    try:
        pts = np.asarray(kps, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"key points must be numbers: {exc}") from None
    if pts.ndim != 2 or pts.shape not in ((3, 2), (5, 2)):
        raise InputError(f"key points must be 3 or 5 (x, y) pairs (eye, eye, nose, ...), got shape {pts.shape}")
    pts = pts[:3]
    if not np.isfinite(pts).all():
        raise InputError("key points contain NaN or infinite values")
    w, h = size
    if (pts[:, 0] < 0).any() or (pts[:, 0] > w).any() or (pts[:, 1] < 0).any() or (pts[:, 1] > h).any():
        raise InputError(f"key points must lie inside the {w}x{h} portrait, got {pts.round(1).tolist()}")
    _check_face_shape(pts)
    return pts.astype(np.float32)


def _check_face_shape(pts: np.ndarray) -> None:
    """Refuse key points no face has: eyes (nearly) on one spot, a nose on the eye line or absurdly far below."""
    eyes = pts[1] - pts[0]
    eye_distance = float(np.hypot(*eyes))
    nose = pts[2] - (pts[0] + pts[1]) / 2
    nose_height = float(np.hypot(*nose))
    shown = np.round(pts, 1).tolist()
    if eye_distance < MIN_EYE_DISTANCE_PX:
        raise InputError(f"the key points are degenerate: the eyes are {eye_distance:.1f} px apart ({shown})")
    if nose_height > MAX_NOSE_TO_EYES * NOSE_BELOW_EYES * eye_distance:
        raise InputError(f"the key points are degenerate: the nose is far below the eyes for their distance ({shown})")
    if abs(float(eyes[0] * nose[1] - eyes[1] * nose[0])) < MIN_NOSE_ANGLE_SIN * eye_distance * nose_height:
        raise InputError(f"the key points are degenerate: the nose lies on the eye line ({shown})")


def load_default_portrait() -> tuple[Image.Image, np.ndarray]:
    """The shipped portrait (RGB) and its three key points (eyes, nose) in its pixels."""
    import json

    meta = json.loads(DEFAULT_PORTRAIT.with_suffix(".json").read_text())
    with Image.open(DEFAULT_PORTRAIT) as image:
        return image.convert("RGB"), np.asarray(meta["kps"], dtype=np.float32)
