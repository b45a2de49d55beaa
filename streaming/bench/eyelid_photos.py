"""`vexpress-rt bench --blink`: the eyelid measured on real photographs with an independent eye-openness measure.

The photos: scikit-image's `astronaut` (NASA, Eileen Collins: the shipped default portrait) and insightface's
`Tom_Hanks_54745.png`, each cropped to the model's framing by `streaming.portrait` as an upload would be. The
measure: the eye aspect ratio (EAR, Soukupova & Cech 2016) of dlib's 68-point landmarks (the predictor that
`face-recognition-models` ships; `pip install -e '.[test]'`), the face found once on the untouched photo. Per photo
and rate, 60 s at 25 fps of the session's schedule: blinks requested and counted (EAR falling below 75 % of
the open photo's), EAR open / at full closure / with the eyes painted out (does the measure
respond at all?), the largest pixel change outside the eye boxes, and ms per frame of the eyelid.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..blink_schedule import BlinkSchedule
from ..eyelid import close_eyes, eye_boxes
from ..portrait import prepare_portrait

SIZE = 512
FPS = 25
RATES = (0, 10, 20, 30)
CLOSED_BELOW = 0.75  # a blink starts when the EAR falls below this fraction of the open photo's ...
OPEN_ABOVE = 0.9  # ... and ends when it is back above this fraction


@dataclass
class Photo:
    name: str
    image: np.ndarray  # uint8 (SIZE, SIZE, 3)
    kps: np.ndarray  # (3, 2) eyes and nose in its pixels
    kps_source: str


def _dlib_models() -> tuple[Any, ...]:  # dlib's detector and predictors (dlib is untyped)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("dlib") is None:
        raise RuntimeError("the blink measure needs dlib and its models: pip install dlib-bin face-recognition-models")
    import dlib

    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat")),
        dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
    )


def photos(extra: str | Path | None = None) -> list[Photo]:
    """The two real photographs (and every image in the folder `extra`), cropped as uploads are.

    The astronaut's key points come from the portrait detector; on the tilted Tom Hanks photo its estimate is
    18 px off, so there (and on `extra` photos) the eye centres are given: the mean of each eye's corners by
    dlib's 5-point model (another model than the 68-point measure), as an upload with key points or insightface
    would give them."""
    import insightface
    from skimage.data import astronaut

    image, kps = prepare_portrait(Image.fromarray(astronaut()), SIZE, SIZE)
    out = [Photo("astronaut", np.asarray(image), kps, "streaming.portrait detector")]
    tom = Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"
    with Image.open(tom) as photo:
        crop, detected = prepare_portrait(photo, SIZE, SIZE)
    out.append(_with_dlib_eyes("tom_hanks", np.asarray(crop), detected))
    for path in sorted(Path(extra).iterdir()) if extra else []:
        with Image.open(path) as photo:
            crop, detected = prepare_portrait(photo, SIZE, SIZE)
        out.append(_with_dlib_eyes(path.stem, np.asarray(crop), detected))
    return out


def _with_dlib_eyes(name: str, pixels: np.ndarray, detected: np.ndarray) -> Photo:
    detector, _, five = _dlib_models()
    shape = five(pixels, detector(pixels, 1)[0])
    corners = np.array([[shape.part(i).x, shape.part(i).y] for i in range(4)], np.float32)
    eyes = sorted([corners[:2].mean(0), corners[2:].mean(0)], key=lambda p: float(p[0]))
    return Photo(name, pixels, np.array([*eyes, detected[2]], np.float32), "dlib 5-point eye corners")


class EyeMeter:
    """Eye aspect ratio (both eyes' mean) by dlib's 68-point predictor, the face box found on the untouched photo."""

    def __init__(self, untouched: np.ndarray):
        detector, self._predictor, _ = _dlib_models()
        faces = detector(untouched, 1)
        if not faces:
            raise RuntimeError("dlib finds no face in the photo")
        self._face = faces[0]

    def ear(self, image: np.ndarray) -> float:
        shape = self._predictor(image, self._face)
        p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(36, 48)], np.float64)
        return float(np.mean([_ear(p[:6]), _ear(p[6:])]))


def _ear(eye: np.ndarray) -> float:
    vertical = np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])
    return float(vertical / (2 * np.linalg.norm(eye[0] - eye[3])))


def outside_eye_boxes(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    mask = np.ones(image.shape[:2], bool)
    for box in eye_boxes(kps, image.shape[1], image.shape[0]):
        mask[box.y0 : box.y1, box.x0 : box.x1] = False
    return mask


@dataclass
class BlinkFigures:
    photo: str
    rate: float
    seconds: float
    requested: float
    counted: int
    ear_open: float
    ear_closed: float  # mean over frames at full closure (nan without any)
    ear_eyes_removed: float  # the eye openings painted over with skin: does the measure respond at all?
    max_change_outside_eyes: int  # largest |pixel change| outside the eye boxes, over every frame
    ms_per_frame: float  # the eyelid on a 512x512 frame, mean over frames with the eyes (partly) closed
    ms_per_frame_max: float


def measure(photo: Photo, rate: float, seconds: float = 60.0, fps: int = FPS, seed: int = 0) -> BlinkFigures:
    """Blink `photo` at `rate` for `seconds` and count the blinks the landmark model sees.

    Frames with the eyes open are the photo itself (the very array: nothing was drawn); the measure runs on the
    others, and their change outside the eye boxes is taken."""
    meter = EyeMeter(photo.image)
    ear_open = meter.ear(photo.image)
    threshold = CLOSED_BELOW * ear_open
    outside = outside_eye_boxes(photo.image, photo.kps)
    schedule = BlinkSchedule(rate, fps, seed)
    counted, below, max_change = 0, False, 0
    closed_ears: list[float] = []
    times: list[float] = []
    for index in range(int(round(seconds * fps))):
        closure = schedule.closure(index)
        start = time.perf_counter()
        frame = close_eyes(photo.image, photo.kps, closure)
        elapsed = time.perf_counter() - start
        if frame is photo.image:
            ear = ear_open
        else:
            change = np.abs(frame.astype(np.int16) - photo.image.astype(np.int16))
            max_change = max(max_change, int(change[outside].max()))
            times.append(elapsed)
            ear = meter.ear(frame)
            if closure >= 1:
                closed_ears.append(ear)
        if not below and ear < threshold:
            counted, below = counted + 1, True
        elif below and ear > OPEN_ABOVE * ear_open:
            below = False
    return BlinkFigures(
        photo.name,
        rate,
        seconds,
        rate * seconds / 60,
        counted,
        round(ear_open, 3),
        round(float(np.mean(closed_ears)), 3) if closed_ears else float("nan"),
        round(meter.ear(_eyes_removed(photo)), 3),
        max_change,
        round(1000 * float(np.mean(times)), 2) if times else 0.0,
        round(1000 * float(np.max(times)), 2) if times else 0.0,
    )


def _eyes_removed(photo: Photo) -> np.ndarray:
    """The photo with the lower half of each eye box (the eye opening) painted the colour of the skin below."""
    out: np.ndarray = photo.image.copy()
    for box in eye_boxes(photo.kps, SIZE, SIZE):
        skin = photo.image[box.y1 : box.y1 + 10, box.x0 : box.x1].reshape(-1, 3).mean(0)
        out[(box.y0 + box.y1) // 2 : box.y1, box.x0 : box.x1] = skin.astype(np.uint8)
    return out


def contact_sheet(
    path: str | Path, closures: tuple[float, ...] = (0.0, 0.5, 1.0), extra: str | Path | None = None
) -> Path:
    """One row per photo (its eyes region), one column per closure: docs/img/blink.png."""
    rows = []
    for photo in photos(extra):
        boxes = eye_boxes(photo.kps, SIZE, SIZE)
        x0, x1 = min(b.x0 for b in boxes) - 16, max(b.x1 for b in boxes) + 16
        y0, y1 = min(b.y0 for b in boxes) - 16, max(b.y1 for b in boxes) + 16
        tiles = [close_eyes(photo.image, photo.kps, c)[y0:y1, x0:x1] for c in closures]
        row = np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1)
        rows.append(np.asarray(Image.fromarray(row).resize((720, round(720 * row.shape[0] / row.shape[1])))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, optimize=True)
    return path


def blink_figures(
    seconds: float = 60.0, rates: tuple[float, ...] = RATES, extra: str | Path | None = None
) -> list[dict[str, Any]]:
    return [asdict(measure(photo, rate, seconds)) for photo in photos(extra) for rate in rates]


def print_blink_figures(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'photo':<10} {'rate/min':>8} {'requested':>9} {'counted':>7} {'EAR open':>8} {'closed':>7} "
        f"{'no eyes':>7} {'max diff outside':>16} {'ms/frame':>8} {'max ms':>7}"
    )
    for r in rows:
        print(
            f"{r['photo']:<10} {r['rate']:>8g} {r['requested']:>9g} {r['counted']:>7} {r['ear_open']:>8.3f} "
            f"{r['ear_closed']:>7.3f} {r['ear_eyes_removed']:>7.3f} {r['max_change_outside_eyes']:>16} "
            f"{r['ms_per_frame']:>8.2f} {r['ms_per_frame_max']:>7.2f}"
        )
