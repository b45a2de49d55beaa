"""Regenerate default_portrait.png (512 x 512) and default_portrait.json beside this script.

The source is scikit-image's `astronaut` photo (NASA, Eileen Collins, public domain); the face and its key points
are found and cropped with `streaming.portrait`, as an uploaded portrait would be. Dev-time only (scikit-image
comes with insightface): `python streaming/assets/make_default_portrait.py` from the repository root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

SIZE = 512
SOURCE = (
    "scikit-image skimage.data.astronaut(): NASA photograph of astronaut Eileen Collins "
    "(NASA Great Images, https://flic.kr/p/r9qvLn), cropped to the face with streaming.portrait"
)
LICENSE = "Public domain (NASA photograph; no known copyright restrictions)"


def main() -> None:
    from PIL import Image
    from skimage.data import astronaut

    from streaming.portrait import crop_portrait, detect_face_kps

    photo = Image.fromarray(astronaut())
    face = detect_face_kps(photo)
    crop, kps = crop_portrait(photo, face, SIZE, SIZE)
    crop.save(HERE / "default_portrait.png", optimize=True)
    meta = {
        "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in kps],
        "source": SOURCE,
        "license": LICENSE,
        "detector": face.detector,
        "size": [SIZE, SIZE],
    }
    lines = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in meta.items())
    (HERE / "default_portrait.json").write_text("{\n" + lines + "\n}\n")
    print(f"default portrait: {face.detector} key points {meta['kps']}")


if __name__ == "__main__":
    main()
