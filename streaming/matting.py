"""The person matte of a portrait photo, once per avatar, and how it follows the head in each frame.

Which model: none of the segmentation models that the registries ship inside a package fits (docs/framing.md):
mediapipe's selfie segmenter is inside the wheels of mediapipe 0.10.x only (the legacy `solutions` API), and those
pin protobuf < 5 and numpy < 2 (ours: protobuf 6, numpy 2); mediapipe 1.x has the tasks API but no model in its
wheel (a .tflite must be downloaded); rembg, backgroundremover, snipbg and the like download their weights at run
time. So the matte is computed here from the photo itself, once: a graph cut (OpenCV's GrabCut) on the photo
shrunk to 320 px, seeded from where the crop box says the face and the body are. Its colour models are learned
from what the seeds are sure of, plus the probable person that looks like none of the sure background (and the
probable background that looks like none of the sure person), so a body prior that covers backdrop does not
teach the person model the backdrop; the image border outside the body prior that looks like nothing of the sure
person is background too. A greyscale photo gets local texture (the spread of grey over two windows sized from
the face) in place of the two colour channels it lacks. Then things thinner than a tenth of the face (poles,
tripod legs, cables) are cut off, the part holding the face is kept, and a colour-guided filter (He et al.)
snaps the edge to the photo's own edges and softens it over a pixel or two. The body and the background do not
move in a V-Express stream; only the head moves inside the crop, so per frame the matte's head part is moved
with the head (`head_motion` of the key points, weighted by `head_weight`), which costs one small warp instead
of a segmentation per frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from .portrait import DEFAULT_SCALE, FACE_CENTRE_HEIGHT, face_box_from_kps

GRABCUT_SIDE = 320  # GrabCut runs on the photo shrunk to this longer side (its cost grows with the pixels)
GMM_COMPONENTS = 5  # OpenCV's GrabCut models each side with a mixture of 5 Gaussians (65 numbers)
UNLIKE = 5.0  # a pixel "looks like none of" a seed set below this percentile of the set's own log-likelihoods
THIN = 0.05  # parts narrower than 2 x this many face sizes are cut off the person (opening)
TEXTURE_WINDOWS = (0.06, 0.3)  # greyscale photos: local grey spread over windows of these many face sizes ...
TEXTURE_GAIN = 4.0  # ... times this, as two feature channels (0..255)
GREY_LEVELS = 2.0  # a photo whose channels differ by less than this on average is greyscale
MIN_SEED_PIXELS = 20  # fewer sure pixels on either side: the seeds are the matte (the crop fills the photo)
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


def _features(image: np.ndarray, face: float) -> np.ndarray:
    """uint8 (h, w, 3) that the graph cut compares pixels by: the colours (BGR); for a greyscale photo the grey and
    its local spread over two windows sized from the face (texture: grass and gravel from a dark coat or the sky),
    since its colour channels say nothing more."""
    pixels = image.astype(np.int16)
    spread = np.abs(pixels[:, :, 0] - pixels[:, :, 1]).mean() + np.abs(pixels[:, :, 1] - pixels[:, :, 2]).mean()
    if spread > GREY_LEVELS:
        return np.ascontiguousarray(image[:, :, ::-1])
    grey = image[:, :, 1].astype(np.float32)
    channels = [grey]
    for i, fraction in enumerate(TEXTURE_WINDOWS):
        size = 2 * max(1, round(fraction * face / 2)) + 1
        mean = cv2.blur(grey, (size, size))
        deviation = np.sqrt(np.maximum(cv2.blur(grey * grey, (size, size)) - mean * mean, 0.0))
        channels.append(np.clip(deviation * TEXTURE_GAIN / (1 + i), 0, 255))  # the wider window spreads more
    return np.ascontiguousarray(np.stack(channels, axis=-1).astype(np.uint8))


def _learn(features: np.ndarray, person: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GrabCut's (background, person) colour models (1 x 65 float64 each) learned from these pixels only: GrabCut
    run for 0 iterations on a strip of them, which only fits the mixtures."""
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    strip = np.ascontiguousarray(np.concatenate([features[person], features[background]])[None])
    labels = np.concatenate(
        [np.full(int(person.sum()), cv2.GC_FGD, np.uint8), np.full(int(background.sum()), cv2.GC_BGD, np.uint8)]
    )[None]
    cv2.setRNGSeed(0)  # the mixtures start from k-means: deterministic
    cv2.grabCut(strip, labels, (0, 0, 0, 0), bgd, fgd, 0, cv2.GC_INIT_WITH_MASK)
    return bgd, fgd


def _log_likelihood(model: np.ndarray, features: np.ndarray) -> np.ndarray:
    """float64 (h, w): log of a GrabCut colour model's density at each pixel (up to GrabCut's constant)."""
    k = GMM_COMPONENTS
    weights, means = model[0, :k], model[0, k : 4 * k].reshape(k, 3)
    covariances = model[0, 4 * k :].reshape(k, 3, 3)
    x = features.reshape(-1, 3).astype(np.float64)
    density = np.zeros(len(x))
    for weight, mean, covariance in zip(weights, means, covariances):
        if weight <= 0:
            continue
        d = x - mean
        q = np.einsum("ni,ij,nj->n", d, np.linalg.inv(covariance), d)
        density += weight * np.exp(-0.5 * q) / np.sqrt(max(np.linalg.det(covariance), 1e-12))
    result: np.ndarray = np.log(density + 1e-300).reshape(features.shape[:2])
    return result


def _unlike(model: np.ndarray, features: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """bool (h, w): the pixels that the model of `seeds` explains worse than it explains almost all of them."""
    log_likelihood = _log_likelihood(model, features)
    result: np.ndarray = log_likelihood < np.percentile(log_likelihood[seeds], UNLIKE)
    return result


def _cut(features: np.ndarray, mask: np.ndarray) -> None:
    """The graph cut, in place on GrabCut's `mask` (the seeds in, the person/background labels out)."""
    h, w = mask.shape
    sure_person = mask == cv2.GC_FGD
    _, person_model = _learn(features, sure_person, mask == cv2.GC_BGD)
    # the border outside the body prior, where nothing looks like the sure person: background
    edge = max(2, round(0.02 * max(h, w)))
    border = np.zeros((h, w), bool)
    border[-edge:], border[:, :edge], border[:, w - edge :] = True, True, True
    border &= mask == cv2.GC_PR_BGD
    mask[border & _unlike(person_model, features, sure_person)] = cv2.GC_BGD
    sure_background = mask == cv2.GC_BGD
    background_model, person_model = _learn(features, sure_person, sure_background)
    # what each side's models learn from: the sure seeds, and the probable pixels unlike the other side's seeds
    person = sure_person | ((mask == cv2.GC_PR_FGD) & _unlike(background_model, features, sure_background))
    background = sure_background | ((mask == cv2.GC_PR_BGD) & _unlike(person_model, features, sure_person))
    background_model, person_model = _learn(features, person, background)
    cv2.grabCut(features, mask, (0, 0, 0, 0), background_model, person_model, 1, cv2.GC_EVAL_FREEZE_MODEL)


def portrait_matte(pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """float32 (H, W) in [0, 1]: the person in the RGB photo `pixels`, whose face crop box is `box` (photo
    pixels). Deterministic (the colour models start from OpenCV's k-means with its RNG seeded)."""
    h, w = pixels.shape[:2]
    small = min(1.0, GRABCUT_SIDE / max(h, w))
    sw, sh = max(1, round(w * small)), max(1, round(h * small))
    image = cv2.resize(pixels, (sw, sh), interpolation=cv2.INTER_AREA) if small < 1.0 else pixels
    fx, fy = sw / w, sh / h
    small_box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    face = _face_geometry(small_box)
    mask = _seeds((sh, sw), small_box)
    sure = int((mask == cv2.GC_FGD).sum()), int((mask == cv2.GC_BGD).sum())
    if min(sure) >= MIN_SEED_PIXELS:  # else (the crop fills the photo) the seeds are all there is to go on
        _cut(_features(image, face[2]), mask)
    person = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    # things much thinner than the face (poles, tripod legs, cables) are not the person; the sure person stays
    radius = max(1, round(THIN * face[2]))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    person = cv2.morphologyEx(person.astype(np.uint8), cv2.MORPH_OPEN, disc).astype(bool) | (mask == cv2.GC_FGD)
    person = _largest_part(person, (round(face[0]), round(face[1])))
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
