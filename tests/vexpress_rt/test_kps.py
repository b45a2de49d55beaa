"""Key points: file formats, length fitting, retargeting (with the original's quirks) and V drawing."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from vexpress_rt.errors import InputError, WeightsError
from vexpress_rt.kps import (
    FaceDetector,
    _select_scale_frame,
    draw_v_kps_image,
    extract_kps_sequence_and_audio,
    fit_kps_length,
    load_kps_sequence,
    load_reference_kps,
    retarget,
    save_kps_sequence,
)
from vexpress_rt.media import DecodedAudio, load_audio, write_mp4

MARKER_NAME = "unpickled-code-ran"


def _side_effect(path: str) -> None:
    Path(path).write_text("the unpickler called arbitrary code")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (str(self.marker),))


# -- golden fixtures -----------------------------------------------------------------------------------------


def test_drawing_matches_original_bit_exactly(fixtures_dir: Path) -> None:
    data = np.load(fixtures_dir / "expected" / "module" / "kps_images.npz")
    height, width = data["fix_face"].shape[1:3]
    assert (height, width) == (64, 128)
    fix = draw_v_kps_image(height, width, data["fix_face_kps"][0])
    assert fix.dtype == np.uint8 and fix.shape == (64, 128, 3)
    np.testing.assert_array_equal(fix, data["fix_face"][0])
    for i, kps in enumerate(data["no_retarget_kps"]):
        np.testing.assert_array_equal(draw_v_kps_image(height, width, kps), data["no_retarget"][i], err_msg=f"{i}")
    # The original passed float32 torch rows; same picture.
    as_tensor = torch.from_numpy(data["no_retarget_kps"][3])
    np.testing.assert_array_equal(draw_v_kps_image(height, width, as_tensor), data["no_retarget"][3])


def test_no_retarget_sequence_matches_original(fixtures_dir: Path) -> None:
    data = np.load(fixtures_dir / "expected" / "module" / "kps_images.npz")
    seq = load_kps_sequence(fixtures_dir / "inputs" / "kps.pth")
    assert seq.shape == (30, 3, 2) and seq.dtype == np.float32
    np.testing.assert_array_equal(seq, np.load(fixtures_dir / "inputs" / "kps_sequence.npy"))
    ref = load_reference_kps(fixtures_dir / "inputs" / "reference_kps.npy")
    out = retarget("no_retarget", ref, seq, 36)
    assert out.shape == (36, 3, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, data["no_retarget_kps"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit_kps_length(seq, 36), data["no_retarget_kps"], rtol=0, atol=1e-6)


def test_fix_face_matches_original(fixtures_dir: Path) -> None:
    data = np.load(fixtures_dir / "expected" / "module" / "kps_images.npz")
    ref = load_reference_kps(fixtures_dir / "inputs" / "reference_kps.npy")
    assert ref.shape == (3, 2) and ref.dtype == np.float32
    out = retarget("fix_face", ref, None, 36)
    assert out.shape == (36, 3, 2)
    for frame in out:
        np.testing.assert_array_equal(frame, data["fix_face_kps"][0])


def test_kps_pth_needs_allow_list_and_loads_without_full_pickle(fixtures_dir: Path) -> None:
    path = fixtures_dir / "inputs" / "kps.pth"
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses numpy arrays
        torch.load(path, weights_only=True)
    assert load_kps_sequence(path).shape == (30, 3, 2)


# -- file formats --------------------------------------------------------------------------------------------


def test_arbitrary_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pth"
    torch.save([np.zeros((3, 2), np.float32), _Evil(marker)], path)
    with pytest.raises(InputError, match="cannot read key-point file"):
        load_kps_sequence(path)
    assert not marker.exists()

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(InputError):
        load_kps_sequence(garbage)
    with pytest.raises(InputError, match="not found"):
        load_kps_sequence(tmp_path / "missing.pth")


def test_save_load_round_trip_in_original_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    seq = (rng.random((7, 3, 2)) * 100).astype(np.float32)
    path = tmp_path / "sub" / "kps.pth"
    save_kps_sequence(path, seq)
    raw = torch.load(path, weights_only=False)  # what the original reads
    assert isinstance(raw, list) and len(raw) == 7
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (3, 2) for a in raw)
    np.testing.assert_array_equal(load_kps_sequence(path), seq)
    # Tensors and lists of tensors load too.
    torch.save(torch.from_numpy(seq), tmp_path / "t.pth")
    np.testing.assert_array_equal(load_kps_sequence(tmp_path / "t.pth"), seq)
    torch.save([torch.from_numpy(f) for f in seq], tmp_path / "tl.pth")
    np.testing.assert_array_equal(load_kps_sequence(tmp_path / "tl.pth"), seq)


def test_npy_sequences(tmp_path: Path) -> None:
    five = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
    np.save(tmp_path / "five.npy", five)
    np.testing.assert_array_equal(load_kps_sequence(tmp_path / "five.npy"), five[:, :3])
    np.save(tmp_path / "bad.npy", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(InputError, match="shape"):
        load_kps_sequence(tmp_path / "bad.npy")
    torch.save([], tmp_path / "empty.pth")
    with pytest.raises(InputError, match="empty"):
        load_kps_sequence(tmp_path / "empty.pth")
    torch.save([np.zeros((3, 2), np.float32), np.zeros((2, 2), np.float32)], tmp_path / "ragged.pth")
    with pytest.raises(InputError):
        load_kps_sequence(tmp_path / "ragged.pth")


def test_a_kps_pth_claiming_more_than_it_holds_is_refused_before_any_copy(tmp_path: Path) -> None:
    """Sizes, strides and records are checked against the file: a 1.5 KB file viewing one float as 50 M frames,
    overlapping strides, deflated records (a zip bomb) and the legacy format are refused; real views load."""
    expanded = tmp_path / "expanded.pth"
    torch.save(torch.zeros(1).expand(50_000_000, 3, 2), expanded)
    assert expanded.stat().st_size < 2000
    with pytest.raises(InputError, match="50000000 key-point frames, more than the 9000 allowed"):
        load_kps_sequence(expanded, max_frames=9000)
    with pytest.raises(InputError, match="overlap"):  # without a frame limit the layout still gives it away
        load_kps_sequence(expanded)
    overlapping = tmp_path / "overlapping.pth"
    torch.save(torch.as_strided(torch.zeros(6000), (1000, 3, 2), (1, 1, 1)), overlapping)
    with pytest.raises(InputError, match="overlap"):
        load_kps_sequence(overlapping)
    torch.save([torch.zeros(1).expand(3, 2)] * 4, tmp_path / "expanded_rows.pth")
    with pytest.raises(InputError, match="overlap"):
        load_kps_sequence(tmp_path / "expanded_rows.pth")
    torch.save([np.zeros((3, 2), np.float32)] * 10, tmp_path / "ten.pth")
    with pytest.raises(InputError, match="10 key-point frames, more than the 9 allowed"):
        load_kps_sequence(tmp_path / "ten.pth", max_frames=9)

    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(tmp_path / "ten.pth") as stored, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for entry in stored.infolist():
            out.writestr(entry.filename, stored.read(entry.filename))
    with pytest.raises(InputError, match="compressed records are not accepted"):
        load_kps_sequence(deflated)
    torch.save(torch.zeros(4, 3, 2), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="zip format"):
        load_kps_sequence(tmp_path / "legacy.pth")

    five = torch.arange(4 * 5 * 2, dtype=torch.float32).reshape(4, 5, 2)
    torch.save(five[:, :3], tmp_path / "view.pth")  # a slice: strided, within its storage
    np.testing.assert_array_equal(load_kps_sequence(tmp_path / "view.pth"), five[:, :3].numpy())


def test_a_npy_header_is_checked_before_its_data(tmp_path: Path) -> None:
    def claiming(frames: int, descr: str = "<f4") -> Path:
        path = tmp_path / f"{frames}{descr[1:]}.npy"
        with path.open("wb") as out:
            header = {"descr": descr, "fortran_order": False, "shape": (frames, 3, 2)}
            np.lib.format.write_array_header_1_0(out, header)
            out.write(bytes(24))
        return path

    with pytest.raises(InputError, match="10000000000 key-point frames, more than the 9000 allowed"):
        load_kps_sequence(claiming(10_000_000_000), max_frames=9000)
    with pytest.raises(InputError, match="promises 1200000000 bytes of key points, the file holds 24"):
        load_kps_sequence(claiming(50_000_000))
    with pytest.raises(InputError, match="must be numbers, got dtype object"):
        load_kps_sequence(claiming(1, "|O"))
    with pytest.raises(InputError, match="must be numbers"):
        load_kps_sequence(claiming(1, "<U100000000"))
    fortran = np.asfortranarray(np.arange(4 * 3 * 2, dtype=np.float64).reshape(4, 3, 2))
    np.save(tmp_path / "fortran.npy", fortran)
    np.testing.assert_array_equal(load_kps_sequence(tmp_path / "fortran.npy"), fortran.astype(np.float32))


def test_reference_kps_json_and_npy(tmp_path: Path) -> None:
    five = [[52.65, 25.05], [73.8, 24.775], [63.2, 30.675], [54.45, 36.3], [72.05, 36.15]]
    (tmp_path / "list.json").write_text(json.dumps(five))
    (tmp_path / "obj.json").write_text(json.dumps({"kps": five[:3]}))
    expected = np.array(five[:3], np.float32)
    for name in ("list.json", "obj.json"):
        got = load_reference_kps(tmp_path / name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
    np.save(tmp_path / "three.npy", np.array(five[:3], np.float64))
    np.testing.assert_array_equal(load_reference_kps(tmp_path / "three.npy"), expected)

    (tmp_path / "four.json").write_text(json.dumps(five[:4]))
    (tmp_path / "nokps.json").write_text(json.dumps({"points": five}))
    (tmp_path / "broken.json").write_text("{not json")
    np.save(tmp_path / "flat.npy", np.zeros(10, np.float32))
    (tmp_path / "kps.txt").write_text("1 2")
    for name in ("four.json", "nokps.json", "broken.json", "flat.npy", "kps.txt", "missing.json"):
        with pytest.raises(InputError):
            load_reference_kps(tmp_path / name)


# -- length fitting and retargeting --------------------------------------------------------------------------


def test_fit_kps_length() -> None:
    seq = np.stack([np.full((3, 2), i, np.float32) for i in range(10)])
    np.testing.assert_array_equal(fit_kps_length(seq, 10), seq)  # identity
    np.testing.assert_array_equal(fit_kps_length(seq, 4), seq[:4])  # cut, then identity
    stretched = fit_kps_length(seq[:2], 4)  # align_corners=False: 0, 0.25, 0.75, 1
    np.testing.assert_allclose(stretched[:, 0, 0], [0.0, 0.25, 0.75, 1.0])


REF = np.array([[40.0, 30.0], [60.0, 30.0], [50.0, 40.0]], np.float32)  # eyes 20 apart, nose 10 below


def _driving() -> np.ndarray:
    """4 symmetric faces (eye/nose ratio 1, like REF) that translate and grow; the last is 2x REF's size."""
    frames = []
    for k, (half_w, nose_h) in enumerate([(10, 10), (12, 10), (14, 15), (20, 20)]):
        dx, dy = 100 + 3 * k, 50 + 2 * k
        frames.append([[dx - half_w, dy], [dx + half_w, dy], [dx, dy + nose_h]])
    return np.array(frames, np.float32)


def test_scale_frame_selection_reproduces_the_bug() -> None:
    # Every frame is within 1 of the reference ratio, so the last wins (intent: the first, exact match).
    assert _select_scale_frame(REF, _driving()) == 3
    # A worse frame (ratio ~0.82) still beats an exact match that comes before it.
    lopsided = np.array([[[0, 0], [20, 0], [8, 10]]], np.float32)  # ratio ~ 0.78
    seq = np.concatenate([REF[None], lopsided])
    assert _select_scale_frame(REF, seq) == 1


def test_offset_retarget_halved_inverted_nose_offset() -> None:
    drv = _driving()
    out = retarget("offset_retarget", REF, drv, 4)
    assert out.shape == (4, 3, 2) and out.dtype == np.float32
    scale = np.array([0.5, 0.5])  # from the LAST frame: eyes 40 -> 20, nose 20 -> 10
    nose = drv[:, 2, :].astype(np.float64) * scale
    expected = REF[None].astype(np.float64) - ((nose - nose[0]) / 2.0)[:, None, :]
    np.testing.assert_allclose(out, expected, atol=1e-4)
    np.testing.assert_array_equal(out[0], REF)  # frame 0 has no offset
    # The face moves opposite to the driver: driver nose goes right/down, output goes left/up.
    assert out[3, 2, 0] < REF[2, 0] and out[3, 2, 1] < REF[2, 1]
    # The face shape never changes.
    np.testing.assert_allclose(out - out[:, 2:3, :], np.broadcast_to(REF - REF[2], out.shape), atol=1e-4)


def test_naive_retarget_puts_frame0_nose_on_reference_nose() -> None:
    drv = _driving()
    out = retarget("naive_retarget", REF, drv, 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 2], REF[2], atol=1e-5)
    scaled = drv.astype(np.float64) * np.array([0.5, 0.5])
    expected = scaled - (scaled[0, 2] - REF[2].astype(np.float64))
    np.testing.assert_allclose(out, expected, atol=1e-4)
    # Last frame: the driver's size scaled by the last frame's scales = the reference size.
    np.testing.assert_allclose(out[3, 1, 0] - out[3, 0, 0], 20.0, atol=1e-4)


def test_retarget_errors_and_length_fit() -> None:
    with pytest.raises(InputError, match="driving"):
        retarget("no_retarget", REF, None, 4)
    with pytest.raises(InputError, match="driving"):
        retarget("naive_retarget", REF, None, 4)
    with pytest.raises(InputError, match="unknown retarget"):
        retarget("mirror", REF, _driving(), 4)
    # Driving sequences are length-fitted first.
    assert retarget("offset_retarget", REF, _driving(), 9).shape == (9, 3, 2)
    assert retarget("no_retarget", REF, _driving(), 2).shape == (2, 3, 2)
    # fix_face ignores a driving sequence.
    np.testing.assert_array_equal(retarget("fix_face", REF, _driving(), 5), np.repeat(REF[None], 5, 0))


# -- face detector -------------------------------------------------------------------------------------------


def test_missing_insightface_models_is_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        FaceDetector(tmp_path / "insightface_models", height=64, width=128)
    message = str(info.value)
    assert str(tmp_path / "insightface_models" / "models" / "buffalo_l") in message
    assert "download-weights" in message
    assert not (tmp_path / "insightface_models").exists()  # nothing was downloaded or created

    pack = tmp_path / "insightface_models" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "README.txt").write_text("no onnx here")
    with pytest.raises(WeightsError, match="buffalo_l"):
        FaceDetector(tmp_path / "insightface_models")


class _FakeFaceAnalysis:
    """Stands in for insightface.app.FaceAnalysis: one face whose kps follow the frame's mean brightness."""

    calls: list[tuple[str, Any]] = []
    faces_for_mean: dict[int, int] = {}  # mean grey level -> number of faces (default 1)

    def __init__(self, **kwargs: Any) -> None:
        _FakeFaceAnalysis.calls.append(("init", kwargs))

    def prepare(self, **kwargs: Any) -> None:
        _FakeFaceAnalysis.calls.append(("prepare", kwargs))

    def get(self, img: np.ndarray) -> list[SimpleNamespace]:
        _FakeFaceAnalysis.calls.append(("get", img.shape))
        level = round(float(img.mean()))
        kps = np.array([[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]], np.float32) + level
        return [SimpleNamespace(kps=kps)] * self.faces_for_mean.get(level, 1)


@pytest.fixture
def fake_insightface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import insightface.app

    pack = tmp_path / "models_root" / "insightface_models" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(b"placeholder")
    _FakeFaceAnalysis.calls = []
    _FakeFaceAnalysis.faces_for_mean = {}
    monkeypatch.setattr(insightface.app, "FaceAnalysis", _FakeFaceAnalysis)
    return tmp_path / "models_root" / "insightface_models"


def test_face_detector_setup_and_reference_kps(fake_insightface: Path, tmp_path: Path) -> None:
    detector = FaceDetector(fake_insightface, height=64, width=128)
    (_, init), (_, prepare) = _FakeFaceAnalysis.calls[:2]
    assert init["name"] == "buffalo_l"
    assert init["root"] == str(fake_insightface)
    assert init["providers"] == ["CPUExecutionProvider"]
    assert prepare == {"ctx_id": 0, "det_size": (64, 128)}  # (H, W), as the original passes it

    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.full((100, 50, 3), 7, np.uint8))
    kps = detector.reference_kps_from_image(image, width=128, height=64)
    assert _FakeFaceAnalysis.calls[-1] == ("get", (64, 128, 3))  # resized to W x H
    np.testing.assert_array_equal(kps, np.array([[17, 27], [37, 27], [27, 37]], np.float32))

    _FakeFaceAnalysis.faces_for_mean = {7: 0}
    with pytest.raises(InputError, match="no face"):
        detector.reference_kps_from_image(image, width=128, height=64)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        detector.reference_kps_from_image(tmp_path / "broken.png", width=128, height=64)


def test_extract_kps_sequence_and_audio(fake_insightface: Path, tmp_path: Path) -> None:
    frames = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(6)])
    t = np.arange(16000) / 16000
    audio = DecodedAudio(samples=(0.3 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32), sample_rate=16000)
    video = tmp_path / "drive.mp4"
    write_mp4(video, frames, 6, audio)

    kps_path, audio_path = tmp_path / "out" / "kps.pth", tmp_path / "out" / "aud.wav"
    seq = extract_kps_sequence_and_audio(video, kps_path, audio_path, fake_insightface, width=64, height=48)
    assert seq.shape == (6, 3, 2) and seq.dtype == np.float32
    np.testing.assert_array_equal(load_kps_sequence(kps_path), seq)
    assert all(shape == (48, 64, 3) for kind, shape in _FakeFaceAnalysis.calls if kind == "get")
    levels = seq[:, 0, 0] - 10  # the fake's kps follow each frame's brightness (lossy video: about 10 * i)
    np.testing.assert_allclose(levels, 10 * np.arange(6), atol=3)
    assert load_audio(audio_path).duration == pytest.approx(1.0, abs=0.05)

    _FakeFaceAnalysis.faces_for_mean = {round(float(levels[3])): 2}
    with pytest.raises(InputError, match="2 faces in frame 3"):
        extract_kps_sequence_and_audio(video, kps_path, None, fake_insightface, width=64, height=48)
