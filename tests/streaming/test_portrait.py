"""Portraits: face and key-point detection without insightface's models, cropping, the shipped default portrait."""

from __future__ import annotations

import io
import json
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from streaming.avatar import encode_avatar
from streaming.portrait import (
    MIN_IMAGE_SIDE,
    FaceKps,
    crop_box,
    crop_portrait,
    detect_face_kps,
    prepare_portrait,
)
from vexpress_rt.errors import InputError

# Measured by hand on skimage.data.astronaut() (512 x 512): pupil centres and nose tip.
ASTRONAUT_KPS = np.array([[202.5, 101.0], [246.5, 103.0], [223.0, 126.0]], np.float32)
TOLERANCE = 4.0  # pixels: under a tenth of the 44 px eye distance


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    data = pytest.importorskip("skimage.data")  # scikit-image comes with insightface
    return Image.fromarray(data.astronaut())


def _assert_face_shape(kps: np.ndarray) -> None:
    """What V-Express needs: image-left eye first, the nose below the eyes and between them."""
    (lx, ly), (rx, ry), (nx, ny) = kps
    assert lx < nx < rx, kps
    assert ny > max(ly, ry), kps


# -- detection -------------------------------------------------------------------------------------------------


def test_finds_the_astronaut_face_and_its_key_points(astronaut: Image.Image, tmp_path: Path) -> None:
    # An insightface folder without models: the cascade fallback, and nothing is downloaded or created.
    face = detect_face_kps(astronaut, insightface_root=tmp_path / "insightface_models")
    assert not (tmp_path / "insightface_models").exists()
    assert face.detector in ("opencv", "skimage")
    assert face.kps.shape == (3, 2) and face.kps.dtype == np.float32
    _assert_face_shape(face.kps)
    np.testing.assert_allclose(face.kps, ASTRONAUT_KPS, atol=TOLERANCE)
    x0, y0, x1, y1 = face.bbox
    assert x0 < ASTRONAUT_KPS[:, 0].min() and ASTRONAUT_KPS[:, 0].max() < x1
    assert y0 < ASTRONAUT_KPS[:, 1].min() and ASTRONAUT_KPS[:, 1].max() < y1
    assert 70 < x1 - x0 < 130  # the face, not the whole photo nor the name patch


def test_mirrored_photo_keeps_the_image_left_eye_first(astronaut: Image.Image) -> None:
    face = detect_face_kps(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    _assert_face_shape(face.kps)
    mirrored = ASTRONAUT_KPS[[1, 0, 2]].copy()
    mirrored[:, 0] = astronaut.width - mirrored[:, 0]
    np.testing.assert_allclose(face.kps, mirrored, atol=TOLERANCE)


def test_face_in_a_larger_photo_is_found_where_it_is(astronaut: Image.Image) -> None:
    # A big phone-sized photo with the portrait off-centre: detection runs on a shrunk copy, points come back.
    big = Image.new("RGB", (1600, 1200), (90, 110, 130))
    big.paste(astronaut.resize((1024, 1024), Image.LANCZOS), (500, 100))
    face = detect_face_kps(big)
    np.testing.assert_allclose(face.kps, ASTRONAUT_KPS * 2 + [500, 100], atol=2.5 * TOLERANCE)


@pytest.mark.parametrize("kind", ["grey", "noise"])
def test_no_face_is_a_clear_input_error(kind: str) -> None:
    rng = np.random.default_rng(0)
    pixels = np.full((256, 256, 3), 128, np.uint8) if kind == "grey" else rng.integers(0, 256, (256, 256, 3), np.uint8)
    with pytest.raises(InputError, match="no face found in the portrait"):
        prepare_portrait(Image.fromarray(pixels), 256, 256)


def test_tiny_image_is_refused() -> None:
    small = Image.new("RGB", (MIN_IMAGE_SIDE - 1, 200), (128, 128, 128))
    for call in (lambda: prepare_portrait(small, 512, 512), lambda: detect_face_kps(small)):
        with pytest.raises(InputError, match=f"too small.*{MIN_IMAGE_SIDE} pixels"):
            call()


class _FakeFaceAnalysis:
    """Stands in for insightface's FaceAnalysis: `faces` faces, all with the astronaut's key points."""

    faces = 1

    def __init__(self, **kwargs: Any) -> None:
        pass

    def prepare(self, **kwargs: Any) -> None:
        pass

    def get(self, img: np.ndarray) -> list[SimpleNamespace]:
        assert img.shape == (512, 512, 3)
        kps = np.concatenate([ASTRONAUT_KPS, [[210, 140], [240, 141]]]).astype(np.float32)
        return [SimpleNamespace(kps=kps)] * self.faces


def test_insightface_is_used_when_its_models_are_there(
    astronaut: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import insightface.app

    root = tmp_path / "insightface_models"
    (root / "models" / "buffalo_l").mkdir(parents=True)
    (root / "models" / "buffalo_l" / "det_10g.onnx").write_bytes(b"placeholder")
    monkeypatch.setattr(insightface.app, "FaceAnalysis", _FakeFaceAnalysis)
    face = detect_face_kps(astronaut, insightface_root=root)
    assert face.detector == "insightface" and not face.eyes_estimated
    np.testing.assert_array_equal(face.kps, ASTRONAUT_KPS)

    monkeypatch.setattr(_FakeFaceAnalysis, "faces", 2)  # the original's rule: exactly one face
    with pytest.raises(InputError, match="2 faces in the portrait; exactly one is required"):
        detect_face_kps(astronaut, insightface_root=root)
    monkeypatch.setattr(_FakeFaceAnalysis, "faces", 0)
    with pytest.raises(InputError, match="no face found"):
        detect_face_kps(astronaut, insightface_root=root)


# -- cropping --------------------------------------------------------------------------------------------------


def test_prepared_portrait_frames_the_face_like_training_crops(astronaut: Image.Image) -> None:
    crop, kps = prepare_portrait(astronaut, 512, 512)
    assert crop.size == (512, 512) and crop.mode == "RGB"
    _assert_face_shape(kps)
    eye_distance = float(np.linalg.norm(kps[1] - kps[0]))
    assert 0.23 * 512 < eye_distance < 0.31 * 512  # face (about 2 eye distances) ~ 50-60 % of the width
    assert 0.45 * 512 < (kps[0, 0] + kps[1, 0]) / 2 < 0.55 * 512  # centred
    assert 0.33 * 512 < (kps[0, 1] + kps[1, 1]) / 2 < 0.45 * 512  # eyes a little above the middle
    # The points are on the crop's face: detecting on the crop finds them again.
    again = detect_face_kps(crop)
    np.testing.assert_allclose(again.kps, kps, atol=0.03 * 512)


@pytest.mark.parametrize("size", [(512, 512), (128, 64), (64, 128)])
def test_crop_maps_key_points_there_and_back(astronaut: Image.Image, size: tuple[int, int]) -> None:
    width, height = size
    face = FaceKps((0, 0, 1, 1), ASTRONAUT_KPS, "given")
    crop, kps = crop_portrait(astronaut, face, width, height)
    assert crop.size == (width, height)
    x0, y0, x1, y1 = crop_box(ASTRONAUT_KPS, width, height)
    assert (x1 - x0) / (y1 - y0) == pytest.approx(width / height)
    back = np.stack([x0 + kps[:, 0] * (x1 - x0) / width, y0 + kps[:, 1] * (y1 - y0) / height], axis=1)
    np.testing.assert_allclose(back, ASTRONAUT_KPS, atol=1e-3)
    # The face fills about half of the shorter side, whatever the aspect.
    assert 0.23 < float(np.linalg.norm(kps[1] - kps[0])) / min(width, height) < 0.31
    # The pixels under the mapped left eye are the photo's pupil (dark), not skin.
    pupil = np.asarray(crop.convert("L"), np.float32)[round(kps[0, 1]), round(kps[0, 0])]
    skin = np.asarray(crop.convert("L"), np.float32)[round(kps[2, 1]), round(kps[2, 0])]
    assert pupil < skin - 40


def test_crop_beyond_the_photo_repeats_its_edges() -> None:
    # A face near the corner of a plain photo: the crop leaves the photo; no black bars appear.
    photo = Image.new("RGB", (200, 200), (200, 120, 60))
    crop, kps = prepare_portrait(photo, 256, 256, kps=[[5, 10], [25, 10], [15, 21]])
    assert crop.size == (256, 256)
    assert np.abs(np.asarray(crop, np.int16) - [200, 120, 60]).max() <= 1
    _assert_face_shape(kps)


def test_explicit_key_points_skip_detection(astronaut: Image.Image) -> None:
    crop, kps = prepare_portrait(astronaut, 256, 256, kps=ASTRONAUT_KPS.tolist())
    assert crop.size == (256, 256)
    five = np.concatenate([ASTRONAUT_KPS, [[210, 140], [240, 141]]])  # insightface's 5 points: first 3 used
    _, kps5 = prepare_portrait(astronaut, 256, 256, kps=five)
    np.testing.assert_array_equal(kps5, kps)
    # Explicit points also work where no detector finds a face.
    flat = Image.new("RGB", (300, 300), (128, 128, 128))
    assert prepare_portrait(flat, 128, 128, kps=[[120, 140], [180, 140], [150, 175]])[0].size == (128, 128)
    for bad, message in [
        ([[1, 2], [3, 4]], "3 or 5"),
        ([[100, 100], [140, 100], [120, np.nan]], "NaN"),
        ([[100, 100], [140, 100], [120, 900]], "inside the 512x512"),
        ([[100, 100], [100, 100], [100, 100]], "degenerate"),
    ]:
        with pytest.raises(InputError, match=message):
            prepare_portrait(astronaut, 256, 256, kps=bad)


def test_exif_rotated_phone_photo_is_turned_upright(astronaut: Image.Image) -> None:
    # Stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to show"), as phones do.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    astronaut.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    buffer.seek(0)
    crop, kps = prepare_portrait(Image.open(buffer), 256, 256)
    _, upright = prepare_portrait(astronaut, 256, 256)
    np.testing.assert_allclose(kps, upright, atol=0.03 * 256)


# -- the shipped default portrait -------------------------------------------------------------------------------


def test_default_portrait_ships_with_its_key_points() -> None:
    assets = files("streaming") / "assets"
    with Image.open(assets / "default_portrait.png") as image:
        image.load()
    assert image.size == (512, 512)
    meta = json.loads((assets / "default_portrait.json").read_text())
    assert meta["source"] and meta["license"]
    kps = np.asarray(meta["kps"], np.float32)
    assert kps.shape == (3, 2) and ((kps > 0) & (kps < 512)).all()
    _assert_face_shape(kps)
    # The points are where a detector finds the face in the shipped picture.
    np.testing.assert_allclose(detect_face_kps(image).kps, kps, atol=0.03 * 512)
    # Ready as it is: preparing it at its own size keeps it as it is.
    crop, same = prepare_portrait(image, 512, 512, kps=kps)
    np.testing.assert_allclose(same, kps, atol=0.03 * 512)


def test_prepared_portrait_encodes_as_an_avatar(tiny_models, astronaut: Image.Image) -> None:
    crop, kps = prepare_portrait(astronaut, 128, 64)
    assert crop.size == (128, 64)
    avatar = encode_avatar(tiny_models, crop, kps, 128, 64)
    assert avatar.latent.shape == (1, 4, 8, 16)
    assert avatar.kps_feature.shape[-2:] == (8, 16)
    assert torch.isfinite(avatar.latent).all() and torch.isfinite(avatar.kps_feature).all()
    np.testing.assert_array_equal(avatar.reference_kps, kps)
