"""A presenter's photo for the framing tests: scikit-image's astronaut (a real photo: real local contrast where the
crop's seam falls) made a 1920x1080 upload, the person in the middle of a wider scene."""

from __future__ import annotations

from PIL import Image
from skimage.data import astronaut

PHOTO_SIZE = (1920, 1080)


def presenter_photo() -> Image.Image:
    """The astronaut (512x512) scaled to 1920x1920 and cut to 1920x1080 (rows 200-1279): her head and shoulders
    in a 16:9 frame, as a presenter's upload is."""
    big = Image.fromarray(astronaut()).resize((1920, 1920), Image.Resampling.LANCZOS)
    return big.crop((0, 200, 1920, 1280))
