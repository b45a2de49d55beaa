"""Presenter framing: each generated face crop pasted back into the avatar's whole photo, at the session's output size,
over the session's background.

V-Express generates the face crop that `streaming.portrait.crop_portrait` cut from the uploaded photo; the rest of
the picture is composed here, per output frame, after the session has made it (blink included):

* `framing`: `crop` (the crop as generated: the default), `portrait` (the whole photo at its own aspect, bounded to
  MAX_OUTPUT_PIXELS) or a canvas `WxH` (the photo fitted inside it, centred, bars where the aspects differ).
* The crop is blended back into its box with a feathered seam: an alpha ramp FEATHER_FRACTION of the box's shorter
  side wide, inside the box's border. The box is the static crop box: the pose controls move the head inside the
  generated crop, never the crop itself, so the seam stays where the crop was cut. Outside the ramp the output is
  exactly the photo's pixels (the photo as resized to the output once per session), inside it exactly the crop's.
* `background`: `photo` (the default), a colour `#rrggbb` (a key colour for chroma keying), an image (a
  `data:image/...;base64,` URL), or `transparent` (the frame carries an alpha plane: the matte). Anything but the
  photo needs the person matte (`streaming.matting`): computed once per avatar, then per frame only inside the crop
  box, where the head moves.

Everything that depends only on the photo (`PortraitPhoto`: the bounded photo, its crop box, its matte) is kept
once per avatar; everything that depends on the session's options too (`FrameComposer`: the photo at the output
size, the ramp, the background) once per session; per frame only the crop box's pixels are computed.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vexpress_rt.errors import InputError

from .matting import head_motion, head_weight, portrait_matte

MAX_PHOTO_PIXELS = 1920 * 1080  # the avatar keeps its whole photo at most this large (a 12 MP upload: 6 MB kept)
MAX_OUTPUT_PIXELS = 1920 * 1080  # framed outputs (portrait or canvas) at most 1080p's pixels ...
MAX_OUTPUT_SIDE = 1920  # ... and sides, so that every encoder and sink we feed takes them
MIN_OUTPUT_SIDE = 64
FEATHER_FRACTION = 0.04  # the seam's alpha ramp: this fraction of the crop box's shorter side ...
MIN_FEATHER_PX = 3  # ... but never thinner than this (a small box in a small canvas)
MAX_BACKGROUND_BYTES = 10 << 20  # an uploaded background image, encoded
MAX_BACKGROUND_PIXELS = 4096 * 4096  # ... and decoded (refused before decoding: PIL reads the size first)
MOTION_EPS_PX = 0.5  # head displacement (crop pixels) below which the portrait's own matte is used unchanged

Mode = Literal["crop", "portrait", "canvas"]
_CANVAS = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_COLOUR = re.compile(r"^#([0-9a-fA-F]{6})$")
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


# -- the session's options, parsed in one place -----------------------------------------------------------------
@dataclass(frozen=True)
class Framing:
    """How the output is framed: the crop as generated, the whole portrait, or the portrait in a WxH canvas."""

    mode: Mode = "crop"
    width: int = 0  # canvas only
    height: int = 0

    def __str__(self) -> str:
        return f"{self.width}x{self.height}" if self.mode == "canvas" else self.mode


def parse_framing(value: object) -> Framing:
    """`crop`, `portrait` or `WxH` (even sides MIN_OUTPUT_SIDE..MAX_OUTPUT_SIDE, at most MAX_OUTPUT_PIXELS)."""
    if not isinstance(value, str):
        raise InputError(f'framing must be a string: "crop", "portrait" or "WxH" (e.g. "1280x720"), got {value!r}')
    text = value.strip().lower()
    if text in ("crop", "portrait"):
        return Framing(text)  # type: ignore[arg-type]  # checked just above
    match = _CANVAS.match(text)
    if match is None:
        raise InputError(f'framing must be "crop", "portrait" or "WxH" (e.g. "1280x720"), got {value!r}')
    width, height = int(match[1]), int(match[2])
    if not (MIN_OUTPUT_SIDE <= width <= MAX_OUTPUT_SIDE and MIN_OUTPUT_SIDE <= height <= MAX_OUTPUT_SIDE):
        raise InputError(f"framing {value!r}: each side must be {MIN_OUTPUT_SIDE}..{MAX_OUTPUT_SIDE} pixels")
    if width * height > MAX_OUTPUT_PIXELS:
        raise InputError(f"framing {value!r}: at most {MAX_OUTPUT_PIXELS} pixels (1920x1080)")
    if width % 2 or height % 2:
        raise InputError(f"framing {value!r}: both sides must be even (video encoders need it)")
    return Framing("canvas", width, height)


@dataclass(frozen=True, eq=False)  # eq=False: image is an array
class Background:
    """What shows behind the person: the photo's own, a flat colour, an image, or nothing (an alpha plane)."""

    kind: Literal["photo", "color", "image", "transparent"] = "photo"
    color: tuple[int, int, int] = (0, 0, 0)
    image: np.ndarray | None = None  # uint8 (H, W, 3), kind "image"

    def __str__(self) -> str:
        if self.kind == "color":
            return "#" + "".join(f"{c:02x}" for c in self.color)
        return self.kind


def parse_background(value: object) -> Background:
    """`photo`, `transparent`, `#rrggbb`, or an image as a `data:image/<type>;base64,...` URL (PNG, JPEG, WebP;
    at most MAX_BACKGROUND_BYTES encoded and MAX_BACKGROUND_PIXELS decoded)."""
    if not isinstance(value, str):
        raise InputError(
            f'background must be a string: "photo", "transparent", "#rrggbb" or an image data URL, got '
            f"{type(value).__name__}"
        )
    text = value.strip()
    if text.lower() in ("photo", "transparent"):
        return Background(text.lower())  # type: ignore[arg-type]  # checked just above
    colour = _COLOUR.match(text)
    if colour is not None:
        rgb = bytes.fromhex(colour[1])
        return Background("color", (rgb[0], rgb[1], rgb[2]))
    if _DATA_URL.match(text):
        return Background("image", image=_decode_image(text.split(",", 1)[1]))
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise InputError(
        f'background must be "photo", "transparent", a colour "#rrggbb" or a "data:image/...;base64,"'
        f" URL, got {shown!r}"
    )


def parse_background_or_file(value: str) -> Background:
    """`generate --background`: what `parse_background` takes, or else the path of an image file (PNG, JPEG,
    WebP; the same limits as an uploaded image)."""
    text = value.strip()
    if text.lower() in ("photo", "transparent") or text.startswith("#") or _DATA_URL.match(text):
        return parse_background(text)
    path = Path(text)
    if not path.is_file():
        raise InputError(
            f'background must be "photo", "transparent", a colour "#rrggbb" or an image file, got {value!r} '
            "(no such file)"
        )
    if path.stat().st_size > MAX_BACKGROUND_BYTES:
        raise InputError(f"the background image is larger than {MAX_BACKGROUND_BYTES >> 20} MB")
    return Background("image", image=_image_pixels(path.read_bytes()))


def _decode_image(encoded: str) -> np.ndarray:
    if len(encoded) > MAX_BACKGROUND_BYTES * 4 // 3 + 4:
        raise InputError(f"the background image is larger than {MAX_BACKGROUND_BYTES >> 20} MB")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise InputError(f"the background image cannot be read: {exc}") from None
    return _image_pixels(data)


def _image_pixels(data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) of an encoded image, its size checked before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_BACKGROUND_PIXELS:
                raise InputError(
                    f"the background image is {image.width}x{image.height}: at most {MAX_BACKGROUND_PIXELS} pixels"
                )
            pixels: np.ndarray = np.asarray(image.convert("RGB")).copy()
            return pixels
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"the background image cannot be read: {exc}") from None


# -- per avatar: the whole photo, once --------------------------------------------------------------------------------
Box = tuple[float, float, float, float]


class PortraitPhoto:
    """The avatar's whole (upright RGB) photo, shrunk to at most MAX_PHOTO_PIXELS, and the box its crop was cut
    from, in the kept photo's pixels (it may leave the photo: the crop repeats the edge there). The person matte
    is computed once (the engine asks for it at registration, in its executor) and kept."""

    def __init__(self, pixels: np.ndarray, box: Box):
        self.pixels = pixels
        self.box = box
        self._matte: np.ndarray | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, photo: Image.Image, box: Box, max_pixels: int = MAX_PHOTO_PIXELS) -> PortraitPhoto:
        """`photo`: the upright RGB photo the crop was cut from; `box`: the crop box in its pixels."""
        width, height = photo.size
        scale = min(1.0, math.sqrt(max_pixels / (width * height)))
        if scale < 1.0:
            photo = photo.resize(
                (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS
            )
        sx, sy = photo.width / width, photo.height / height
        pixels = np.ascontiguousarray(np.asarray(photo.convert("RGB")))
        return cls(pixels, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def matte(self) -> np.ndarray:
        """float32 (H, W) in [0, 1]: the person (streaming.matting), computed once."""
        with self._lock:
            if self._matte is None:
                self._matte = portrait_matte(self.pixels, self.box)
            return self._matte


# -- per session: the composer ----------------------------------------------------------------------------------------
def output_size(framing: Framing, photo_size: tuple[int, int], crop_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the session's frames."""
    if framing.mode == "crop":
        return crop_size
    if framing.mode == "canvas":
        return framing.width, framing.height
    w, h = photo_size
    scale = min(1.0, MAX_OUTPUT_SIDE / max(w, h), math.sqrt(MAX_OUTPUT_PIXELS / (w * h)))
    return max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)


def feather_ramp(width: int, height: int, feather: float) -> np.ndarray:
    """uint16 (height, width) weights 0..256 of the pasted crop: 256 inside, a smoothstep down to 0 over `feather`
    pixels at the border (the product of the horizontal and vertical ramps: round corners, no kink)."""

    def ramp(n: int) -> np.ndarray:
        centre = np.arange(n, dtype=np.float64) + 0.5
        t = np.clip(np.minimum(centre, n - centre) / max(feather, 1e-6), 0.0, 1.0)
        return t * t * (3.0 - 2.0 * t)

    if feather <= 0:
        return np.full((height, width), 256, np.uint16)
    weights = ramp(height)[:, None] * ramp(width)[None, :]
    result: np.ndarray = np.round(256.0 * weights).astype(np.uint16)
    return result


@dataclass(frozen=True)
class _Paste:
    """Where the crop goes in the output: its resized size, the part of it inside the output, and the seam band."""

    size: tuple[int, int]  # the crop resized to (w, h)
    out: tuple[slice, slice]  # rows, columns of the output it covers (clipped to the output)
    src: tuple[slice, slice]  # the same pixels in the resized crop
    inner: tuple[slice, slice]  # in the clipped region: where the ramp is 256 (pure crop)
    band: list[tuple[slice, slice]]  # in the clipped region: strips that hold every weight below 256
    weights: np.ndarray  # uint16 (h, w, 1): the ramp over the clipped region


class FrameComposer:
    """Composes one session's output frames from its generated crops (see the module's doc). `compose` is called
    once per frame by the session's reader; everything else is prepared here, once.

    `reference_kps`: the crop's own key points (the avatar's, in crop pixels): the pose a frame's `kps` move from.
    `feather`: the seam's ramp in output pixels (None: FEATHER_FRACTION of the box's shorter side)."""

    def __init__(
        self,
        photo: PortraitPhoto | None,
        framing: Framing,
        background: Background,
        crop_size: tuple[int, int],
        reference_kps: np.ndarray,
        feather: float | None = None,
    ):
        self.framing = framing
        self.background = background
        self.crop_size = crop_size
        self.identity = framing.mode == "crop" and background.kind == "photo"
        if self.identity:
            self.size = crop_size
            return
        if photo is None:
            raise InputError(f"framing {framing} / background {background}: this avatar keeps no photo")
        self.size = output_size(framing, photo.size, crop_size)
        width, height = self.size
        cw, ch = crop_size
        # photo pixels -> output pixels: x_out = sx * x + ox (pixel edges, not centres)
        if framing.mode == "crop":
            x0, y0, x1, y1 = photo.box
            sx, sy = cw / (x1 - x0), ch / (y1 - y0)
            ox, oy = -x0 * sx, -y0 * sy
        else:
            pw, ph = photo.size
            scale = min(width / pw, height / ph)
            fw, fh = max(1, round(pw * scale)), max(1, round(ph * scale))
            sx, sy = fw / pw, fh / ph
            ox, oy = float((width - fw) // 2), float((height - fh) // 2)
        self._photo_out = _place(photo.pixels, sx, sy, ox, oy, self.size, cv2.BORDER_REPLICATE)
        bx0, by0, bx1, by1 = photo.box
        rect = (round(sx * bx0 + ox), round(sy * by0 + oy), round(sx * bx1 + ox), round(sy * by1 + oy))
        if framing.mode == "crop":
            rect, band = (0, 0, width, height), 0.0
        else:
            band = (
                feather
                if feather is not None
                else max(MIN_FEATHER_PX, FEATHER_FRACTION * min(rect[2] - rect[0], rect[3] - rect[1]))
            )
        self.feather = band
        self._paste = _paste_geometry(rect, self.size, band)
        # crop pixels -> output pixels (for the head's motion, measured in crop pixels)
        self._crop_to_out = np.array(
            [[(rect[2] - rect[0]) / cw, 0.0, rect[0]], [0.0, (rect[3] - rect[1]) / ch, rect[1]]], np.float64
        )
        self.reference_kps = np.asarray(reference_kps, np.float64)[:3]
        self.alpha_base: np.ndarray | None = None
        if background.kind == "photo":
            self._base = self._photo_out
            return
        matte = _place(photo.matte(), sx, sy, ox, oy, self.size, cv2.BORDER_CONSTANT)
        self._matte_out = matte
        head = head_weight(self.reference_kps, crop_size)  # (ch, cw) float32, crop pixels
        self._head_out = cv2.resize(head, self._paste.size, interpolation=cv2.INTER_LINEAR)[self._paste.src]
        if background.kind == "transparent":
            self._base = self._photo_out
            self.alpha_base = _alpha_u8(matte)
            return
        self._backdrop = _backdrop(background, self.size)
        self._base = _over(self._photo_out, matte, self._backdrop)

    def seam_weights(self) -> np.ndarray:
        """uint16 (H, W) of the output: how much of each pixel is the generated crop (0..256; 0: the photo's)."""
        weights = np.zeros(self.size[::-1], np.uint16)
        if self.identity:
            return weights + 256
        weights[self._paste.out] = self._paste.weights[:, :, 0]
        return weights

    def to_output(self, points: np.ndarray) -> np.ndarray:
        """Crop pixels -> output pixels (where a point of the generated crop lands in the frame)."""
        if self.identity:
            return np.asarray(points, np.float64)
        mapped: np.ndarray = cv2.transform(np.asarray(points, np.float64)[None], self._crop_to_out)[0]
        return mapped

    # -- per frame ---------------------------------------------------------------------------------------------
    def compose(self, crop: np.ndarray, kps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(RGB uint8 frame of `self.size`, its alpha plane uint8 or None) from a generated crop (uint8 (h, w, 3))
        whose head stands at `kps` (crop pixels; None: the portrait's own pose). A new array each call (sinks may
        keep frames)."""
        if self.identity:
            return crop, None
        paste = self._paste
        rows, cols = paste.out
        resized = (
            crop
            if paste.size == self.crop_size
            else cv2.resize(crop, paste.size, interpolation=_interp(crop.shape[1], paste.size[0]))
        )
        pasted = resized[paste.src]
        if self.background.kind == "photo":
            out = self._base.copy()
            _blend_into(out[rows, cols], pasted, paste)
            return out, None
        # the person over another background: in the crop box the seam first (against the photo), then the matte
        fg = self._photo_out[rows, cols].copy()
        _blend_into(fg, pasted, paste)
        matte = self._frame_matte(kps)
        out = self._base.copy()
        if self.background.kind == "transparent":
            assert self.alpha_base is not None
            alpha = self.alpha_base.copy()
            out[rows, cols] = fg
            alpha[rows, cols] = _alpha_u8(matte)
            return out, alpha
        out[rows, cols] = _over(fg, matte, self._backdrop[rows, cols])
        return out, None

    def _frame_matte(self, kps: np.ndarray | None) -> np.ndarray:
        """The matte inside the crop box for a head at `kps`: the portrait's, its head part moved with the head
        (a similarity transform from the reference points), blended by the head weight (the body stays)."""
        rows, cols = self._paste.out
        static = self._matte_out[rows, cols]
        if kps is None:
            return static
        motion = head_motion(self.reference_kps, np.asarray(kps, np.float64)[:3])
        moved = cv2.transform(self.reference_kps[None], motion)[0]
        if float(np.abs(moved - self.reference_kps).max()) < MOTION_EPS_PX:
            return static
        # the motion in output pixels of the clipped region: region <- output <- crop (motion) <- output
        to_out = np.vstack([self._crop_to_out, [0, 0, 1]])
        shift = np.array([[1, 0, -cols.start], [0, 1, -rows.start], [0, 0, 1]], np.float64)
        full = shift @ to_out @ np.vstack([motion, [0, 0, 1]]) @ np.linalg.inv(to_out) @ np.linalg.inv(shift)
        h, w = static.shape
        warped = cv2.warpAffine(static, full[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        head = self._head_out
        blended: np.ndarray = head * warped + (1.0 - head) * static
        return blended


def _interp(source: int, target: int) -> int:
    """Area averaging where a resize shrinks by 2 or more (no aliasing); bilinear otherwise (OpenCV's area
    resize at a non-integer ratio costs several times more, and a milder shrink does not alias visibly)."""
    return cv2.INTER_AREA if 2 * target <= source else cv2.INTER_LINEAR


def _place(
    pixels: np.ndarray, sx: float, sy: float, ox: float, oy: float, size: tuple[int, int], border: int
) -> np.ndarray:
    """`pixels` mapped into an output of `size` by x_out = sx * x + ox (pixel edges); outside them: black / 0, or
    the edge repeated (`border`)."""
    h, w = pixels.shape[:2]
    width, height = size
    if math.isclose(ox, round(ox)) and math.isclose(oy, round(oy)) and ox >= 0 and oy >= 0:
        fw, fh = round(sx * w), round(sy * h)
        if ox + fw <= width and oy + fh <= height:  # the usual case: a resize into a canvas, bars left black
            out = np.zeros((height, width, *pixels.shape[2:]), pixels.dtype)
            shrink = cv2.INTER_AREA if fw < w else cv2.INTER_LINEAR  # once per session: the best shrink
            resized = pixels if (fw, fh) == (w, h) else cv2.resize(pixels, (fw, fh), interpolation=shrink)
            out[round(oy) : round(oy) + fh, round(ox) : round(ox) + fw] = resized
            return out
    source = pixels
    if sx < 0.5 or sy < 0.5:  # a strong shrink (the crop mode's matte of a big photo): pre-shrink, no aliasing
        factor = min(1.0, 2.0 * max(sx, sy))
        sw, sh = max(1, round(w * factor)), max(1, round(h * factor))
        source = cv2.resize(pixels, (sw, sh), interpolation=cv2.INTER_AREA)
        sx, sy = sx * w / sw, sy * h / sh
    # pixel centres: x_out + 0.5 = sx * (x + 0.5) + ox
    matrix = np.array([[sx, 0.0, ox + 0.5 * sx - 0.5], [0.0, sy, oy + 0.5 * sy - 0.5]], np.float64)
    return cv2.warpAffine(source, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)


def _paste_geometry(rect: tuple[int, int, int, int], size: tuple[int, int], feather: float) -> _Paste:
    x0, y0, x1, y1 = rect
    width, height = size
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(width, x0 + w), min(height, y0 + h)
    if cx1 <= cx0 or cy1 <= cy0:
        raise InputError("the face crop lies outside the framed output")
    out = (slice(cy0, cy1), slice(cx0, cx1))
    src = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    weights = feather_ramp(w, h, feather)[src]
    full = weights == 256
    rows_full = np.flatnonzero(full.any(axis=1))
    cols_full = np.flatnonzero(full.any(axis=0))
    rh, rw = weights.shape
    if rows_full.size == 0:
        inner = (slice(0, 0), slice(0, 0))
        band = [(slice(0, rh), slice(0, rw))]
    else:
        r0, r1 = int(rows_full[0]), int(rows_full[-1]) + 1
        c0, c1 = int(cols_full[0]), int(cols_full[-1]) + 1
        inner = (slice(r0, r1), slice(c0, c1))
        band = [
            (slice(0, r0), slice(0, rw)),
            (slice(r1, rh), slice(0, rw)),
            (slice(r0, r1), slice(0, c0)),
            (slice(r0, r1), slice(c1, rw)),
        ]
        band = [(r, c) for r, c in band if r.stop > r.start and c.stop > c.start]
    return _Paste((w, h), out, src, inner, band, weights[:, :, None])


def _blend_into(region: np.ndarray, pasted: np.ndarray, paste: _Paste) -> None:
    """`region` (a view of the output under the crop) <- the crop, ramped over the seam band (integer weights:
    weight 0 leaves the photo's pixel exactly, 256 gives the crop's)."""
    region[paste.inner] = pasted[paste.inner]
    for rows, cols in paste.band:
        a = paste.weights[rows, cols]
        mixed = pasted[rows, cols].astype(np.uint16) * a + region[rows, cols].astype(np.uint16) * (256 - a) + 128
        region[rows, cols] = (mixed >> 8).astype(np.uint8)


def _alpha_u8(matte: np.ndarray) -> np.ndarray:
    return np.clip(matte * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _over(fg: np.ndarray, matte: np.ndarray, backdrop: np.ndarray) -> np.ndarray:
    """`fg` over `backdrop` through `matte` (float (H, W) in [0, 1]), rounded: where the matte is 0 the backdrop's
    pixel exactly, where it is 1 the foreground's (OpenCV's blend: one pass, several times numpy's speed)."""
    weight = np.ascontiguousarray(matte, np.float32)
    out: np.ndarray = cv2.blendLinear(
        np.ascontiguousarray(fg), np.ascontiguousarray(backdrop), weight, np.float32(1.0) - weight
    )
    return out


def _backdrop(background: Background, size: tuple[int, int]) -> np.ndarray:
    """The new background at the output size: a flat colour, or the image scaled to cover it (centred)."""
    width, height = size
    if background.kind == "color":
        flat: np.ndarray = np.broadcast_to(np.array(background.color, np.uint8), (height, width, 3)).copy()
        return flat
    assert background.image is not None
    image = background.image
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    fw, fh = max(width, round(w * scale)), max(height, round(h * scale))
    resized = cv2.resize(image, (fw, fh), interpolation=_interp(w, fw))
    x, y = (fw - width) // 2, (fh - height) // 2
    return np.ascontiguousarray(resized[y : y + height, x : x + width])


# -- the device path --------------------------------------------------------------------------------------------------
class DevicePaste:
    """The paste-back of a batch of crops into the photo on the model's device (before the copy to the host), for
    the `photo` background: the photo at the output size and the ramp live on `device`, made once. Measured beside
    the host path by `streaming.bench.framing`; sessions compose on the host (docs/framing.md says why)."""

    def __init__(self, composer: FrameComposer, device: torch.device | str):
        if composer.identity or composer.background.kind != "photo":
            raise ValueError("the device path pastes into the photo only")
        self.device = torch.device(device)
        self.size = composer.size
        self._paste = composer._paste
        self._photo = torch.from_numpy(composer._photo_out).to(self.device).permute(2, 0, 1).float()  # (3, H, W)
        self._weights = torch.from_numpy(composer._paste.weights[:, :, 0].astype(np.float32) / 256.0).to(self.device)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """crops: (F, 3, h, w) float in [0, 1] on the device (a decoder's output) -> uint8 (F, H, W, 3) there."""
        paste = self._paste
        rows, cols = paste.out
        w, h = paste.size
        resized = torch.nn.functional.interpolate(
            crops.float() * 255.0, size=(h, w), mode="bilinear", antialias=True, align_corners=False
        )
        pasted = resized[:, :, paste.src[0], paste.src[1]]
        out = self._photo.expand(crops.shape[0], -1, -1, -1).clone()
        region = out[:, :, rows, cols]
        out[:, :, rows, cols] = region + (pasted - region) * self._weights
        return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
