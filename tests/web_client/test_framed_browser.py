"""Presenter framing end to end in a real browser (issue 25): a 1920x1080 presenter photo streamed at 1280x720.

`vexpress-rt serve` (tiny model, 128x64 crops) and headless Chromium run in a loopback-only network namespace
(tests/kit/netns_framed.py). The page uploads the photo, Options > Framing "The photo in 1280x720", Start; a fake
microphone speaks. In the page: every frame handed to the compositor (requestVideoFrameCallback) is 1280x720,
frames are decoded and presented at the session's 25 fps (the standard tests/web_client/test_browser.py holds the
stream to), and frames grabbed into a canvas show, outside the crop box's blend band, the photo as fitted to
1280x720 (within the codec's error, exactly in place), and no seam where the blend starts. Then the OBS viewer
page (`view_url` + `&key=00ff00&bg=transparent`) on a session with the key colour behind the person: its canvas is
transparent where the person matte is 0 and opaque on the person.

The oracle is the photo made independently (`cv2.resize`, as tests/streaming/test_framing.py does) and the
composer's own geometry and matte (where the blend band and the matte are), computed here from the same photo and
key points as the server's registration. `-s` prints the figures docs/framing.md quotes ("In Chromium").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from kit.media_synth import spoken_wav
from kit.netns_browser import run_driver_in_netns
from kit.presenter import presenter_photo
from PIL import Image

from streaming.framing import FrameComposer, PortraitPhoto, parse_background, parse_framing
from streaming.portrait import crop_box, crop_portrait, detect_face_kps, locate_face

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CROP = (128, 64)  # the tiny model's crop (tests/kit/netns_browser.py serves at this size)
OUT = (1280, 720)
FPS = 25
SPEECH = "Good evening. The presenter speaks from her whole photo, framed for the stream, while the crop moves."
# Outside the blend band a received pixel is the photo's within the codec's error. Measured here (VP8 as aiortc's
# rate control sends 1280x720, 2 shared cores): 2.4-5.2 levels mean absolute difference per channel. 8 leaves room
# for a worse moment of the rate control; what the mean cannot see (the photo misplaced by a pixel or two: 4.4 and
# 6.3 here) the alignment search does (the photo fits best unshifted), and a colour shift the signed mean does.
MAX_CODEC_MEAN_ABS = 8.0
MAX_COLOUR_SHIFT = 3.0
SHIFTS = range(-2, 3)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    return spoken_wav(tmp_path_factory.mktemp("speech") / "speech.wav", SPEECH)


@pytest.fixture(scope="module")
def presenter(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The 1920x1080 presenter photo as a PNG file and its eye, eye, nose points (found by the cascade the server
    would use; given to the page so that the test knows the crop box the server cuts)."""
    photo = presenter_photo()
    path = tmp_path_factory.mktemp("presenter") / "presenter.png"
    photo.save(path)
    kps = np.round(detect_face_kps(photo).kps[:3].astype(np.float64), 3)
    return path, kps


def framed(photo_path: Path, kps: np.ndarray, background: str) -> FrameComposer:
    """The composer the server makes for this photo, these key points and a 1280x720 session (Engine.add_avatar's
    steps): its seam weights and matte say where the band and the person are."""
    upright, face = locate_face(Image.open(photo_path), kps, None)
    _, crop_kps = crop_portrait(upright, face, *CROP)
    whole = PortraitPhoto.of(upright, crop_box(face.kps, *CROP))
    return FrameComposer(whole, parse_framing("x".join(map(str, OUT))), parse_background(background), CROP, crop_kps)


# -- the measures -----------------------------------------------------------------------------------------------------
def steps(image: np.ndarray, axis: int) -> np.ndarray:
    """The largest channel's absolute step between neighbours along `axis` (int32)."""
    result: np.ndarray = np.abs(np.diff(image.astype(np.int32), axis=axis)).max(axis=2)
    return result


def crossings(weights: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Every row and column that crosses the blend band: (axis, line, photo_px, crop_px), where photo_px is the
    last pixel of the photo (weight 0) and crop_px the first of the pure crop (weight 256) on that line (axis 1:
    a row, indices are columns; axis 0: a column, indices are rows)."""
    found = []
    for axis, lines in ((1, weights), (0, weights.T)):
        for line, profile in enumerate(lines):
            blended = np.flatnonzero((profile > 0) & (profile < 256))
            for run in np.split(blended, np.flatnonzero(np.diff(blended) != 1) + 1) if blended.size else []:
                before, after = run[0] - 1, run[-1] + 1
                if before < 0 or after >= profile.size:
                    continue
                if profile[before] == 0 and profile[after] == 256:
                    found.append((axis, line, before, after))
                elif profile[before] == 256 and profile[after] == 0:
                    found.append((axis, line, after, before))
    return found


def line_of(image: np.ndarray, axis: int, line: int) -> np.ndarray:
    return image[line] if axis == 1 else image[:, line]


def oriented(values: np.ndarray, outer: int, inner: int, side: int) -> tuple[np.ndarray, int, int]:
    """`values` from `side` pixels before `outer` to `side` after `inner`, in the direction photo -> crop (clipped
    to the frame), with the positions of `outer` and `inner` in it."""
    if inner > outer:
        start, stop = max(0, outer - side), min(len(values), inner + side + 1)
        return values[start:stop].astype(np.int32), outer - start, inner - start
    start, stop = max(0, inner - side), min(len(values), outer + side + 1)
    return values[start:stop][::-1].astype(np.int32), stop - 1 - outer, stop - 1 - inner


def seam_figures(frame: np.ndarray, photo: np.ndarray, weights: np.ndarray, lines: list, side: int = 12) -> dict:
    """On every line crossing the band:
    - boundary: the step from the photo's last pixel into the blend, less the photo's own step there (the step
      "across the blend boundary"); its mean over the lines;
    - beside: the same excess one and two steps further out, in the photo only: the codec's error on steps right
      there (4:2:0 chroma makes it alternate from one pixel to the next); the larger of the two means;
    - band: the largest step anywhere in the band, less what the two sides explain: the larger of their own largest
      steps (`side` pixels of photo outside, of crop inside, as received) plus the ramp's share of the difference
      between them (its steepest weight step times |crop pixel - photo pixel|); its median over the lines.
    A seam (a hard paste, a misplaced band) is a step that neither side nor the ramp explains."""
    boundary, band, beside = [], [], []
    for axis, line, outer, inner in lines:
        got, o, i = oriented(line_of(frame, axis, line), outer, inner, side)
        own, _, _ = oriented(line_of(photo, axis, line), outer, inner, side)
        ramp, _, _ = oriented(line_of(weights, axis, line), outer, inner, side)
        step = np.abs(np.diff(got, axis=0)).max(axis=1)  # step[k]: between k and k + 1
        own_step = np.abs(np.diff(own, axis=0)).max(axis=1)
        boundary.append(step[o] - own_step[o])
        beside.append([step[o - k] - own_step[o - k] for k in (1, 2)] if o >= 2 else [0, 0])
        sides = max(step[:o].max(initial=0), step[i:].max(initial=0))
        share = np.abs(np.diff(ramp[o : i + 1])).max() / 256
        band.append(step[o:i].max() - sides - share * np.abs(got[i] - got[o]).max())
    return {
        "boundary_excess_mean": float(np.mean(boundary)),
        "beside_excess_mean": float(np.mean(beside, axis=0).max()),
        "band_excess_median": float(np.median(band)),
    }


def hard_paste(frame: np.ndarray, lines: list) -> np.ndarray:
    """The same frame with the band filled by the crop's first pure pixel on each line: a seam with no ramp."""
    out = frame.copy()
    for axis, line, outer, inner in lines:
        lo, hi = sorted((outer, inner))
        line_of(out, axis, line)[lo + 1 : hi] = line_of(frame, axis, line)[inner]
    return out


def save_artifacts(workdir: Path) -> None:
    dest = os.environ.get("VEXPRESS_ARTIFACTS")
    if not dest:
        return
    Path(dest).mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "frame0.png", "keyed.png", "page.png"):
        if (workdir / name).exists():
            shutil.copy(workdir / name, Path(dest) / f"framed_{name}")


# -- the test -----------------------------------------------------------------------------------------------------
def test_framed_1280x720_session_plays_in_chromium(model_dir, speech_wav, presenter, tmp_path):
    photo_path, kps = presenter
    workdir = tmp_path / "run"
    args = [
        "--model-dir", str(model_dir), "--wav", str(speech_wav), "--photo", str(photo_path),
        "--kps", json.dumps(kps.tolist()), "--workdir", str(workdir), "--keyed",
    ]  # fmt: skip
    report = run_driver_in_netns("netns_framed.py", args, 150)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    save_artifacts(workdir)
    shown = {k: v for k, v in report.items() if k not in ("server_log_tail",)}
    where = f"\nreport: {json.dumps(shown)[:3000]}\nserver log:\n{report.get('server_log_tail', '')}"
    assert "exception" not in report and report.get("last_error") is None, where
    assert report["interfaces"] == ["lo"], where

    # The session the page made: 1280x720 framing of the photo, at the session fps.
    session = report["session"]
    assert (session["width"], session["height"], session["fps"]) == (*OUT, FPS), where
    assert (session["framing"], session["background"]) == ("1280x720", "photo"), where
    pair = report["pair"] or {}
    assert (pair.get("local") or {}).get("address") == (pair.get("remote") or {}).get("address") == "127.0.0.1", where

    # What Chromium plays: every frame 1280x720, decoded and presented at the session's rate (test_browser.py's
    # standard: within 20 %).
    watch = report["watch"]
    assert watch["video_size"] == list(OUT) and report["stats_frame_size"] == list(OUT), where
    assert watch["callbacks"] > 1 and set(watch["sizes"]) == {"x".join(map(str, OUT))}, where
    presented_fps = watch["presented"] / max(watch["presented_span_s"], 1e-3)
    assert 0.8 * FPS <= report["decoded_fps"] <= 1.2 * FPS, where
    assert 0.8 * FPS <= presented_fps <= 1.2 * FPS, where
    # the microphone's speech went in and the avatar says it back, with the framed video
    assert watch["remote_level_peak"] > 1e-3, where

    # The grabbed frames against the photo as fitted to 1280x720 (made here, independently of the composer).
    photo = cv2.resize(np.asarray(Image.open(photo_path).convert("RGB")), OUT, interpolation=cv2.INTER_AREA)
    composer = framed(photo_path, kps, "photo")
    weights = composer.seam_weights()
    outside, inner = weights == 0, weights == 256
    lines = crossings(weights)
    assert 0.5 < outside.mean() < 0.95 and len(lines) > 500
    # the photo's own local contrast around the band (and, per frame, the codec's error on steps where the photo is
    # expected)
    near = cv2.dilate((weights > 0).astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
    contrast = float(np.mean([steps(photo, 1)[near[:, 1:]].mean(), steps(photo, 0)[near[1:]].mean()]))
    figures = []
    for name in report["frames"]:
        frame = np.asarray(Image.open(workdir / name).convert("RGB"))
        assert frame.shape == (OUT[1], OUT[0], 3), where
        diff = frame.astype(np.int32) - photo
        mean_abs = np.abs(diff[outside]).mean(axis=0)
        expected = photo[outside].astype(np.int32)
        by_shift = {
            (dx, dy): float(np.abs(np.roll(frame, (-dy, -dx), axis=(0, 1))[outside] - expected).mean())
            for dx in SHIFTS
            for dy in SHIFTS
        }
        both = outside[:, 1:] & outside[:, :-1], outside[1:] & outside[:-1]
        codec_step = float(np.mean([np.abs(steps(frame, a) - steps(photo, a))[both[1 - a]].mean() for a in (1, 0)]))
        seam = seam_figures(frame, photo, weights, lines)
        hard = seam_figures(hard_paste(frame, lines), photo, weights, lines)
        figures.append(
            dict(
                frame=name,
                outside_mean_abs_rgb=mean_abs.round(2).tolist(),
                outside_signed_mean_rgb=diff[outside].mean(axis=0).round(2).tolist(),
                best_shift=min(by_shift, key=by_shift.__getitem__),
                shift_2px_mean_abs=round(by_shift[(2, 0)], 2),
                photo_contrast=round(contrast, 2),
                codec_step_error=round(codec_step, 2),
                crop_vs_photo_mean_abs=round(float(np.abs(diff[inner]).mean()), 1),
                **{k: round(v, 2) for k, v in seam.items()},
                hard_paste={k: round(v, 1) for k, v in hard.items()},
            )
        )
        f = figures[-1]
        assert (mean_abs <= MAX_CODEC_MEAN_ABS).all(), f"{f}" + where  # the body and background: the photo's
        assert (np.abs(diff[outside].mean(axis=0)) <= MAX_COLOUR_SHIFT).all(), f"{f}" + where  # its colours
        assert f["best_shift"] == (0, 0), f"{f}" + where  # in place, to the pixel
        assert f["crop_vs_photo_mean_abs"] > 20, f"{f}" + where  # the generated crop is there, not the photo
        # No seam: into the blend the step is the photo's own plus its local contrast and the codec's error on
        # steps (beside the band, or over the whole photo's part where larger), and inside the band no step beyond
        # what the two sides and the ramp make; the same measures see a hard paste.
        codec_at_seam = max(codec_step, seam["beside_excess_mean"])
        assert seam["boundary_excess_mean"] <= contrast + codec_at_seam, f"{f}" + where
        assert seam["band_excess_median"] <= codec_step, f"{f}" + where
        assert hard["boundary_excess_mean"] > 5 * (contrast + codec_at_seam), f"{f}" + where
        assert hard["band_excess_median"] > 5 * codec_step, f"{f}" + where

    # The OBS viewer on a key-colour session, keyed in the page: transparent off the person, opaque on her (8 px
    # in from the matte's edges, away from the crop box where the head's matte moves with the generated head).
    keyed = report["keyed_session"]
    assert (keyed["width"], keyed["height"], keyed["background"]) == (*OUT, "#00ff00"), where
    alpha = framed(photo_path, kps, "transparent").alpha_base
    assert alpha is not None
    shrink = np.ones((17, 17), np.uint8)
    box = cv2.dilate((weights > 0).astype(np.uint8), shrink) > 0
    off_person = (cv2.erode((alpha == 0).astype(np.uint8), shrink) > 0) & ~box
    on_person = (cv2.erode((alpha == 255).astype(np.uint8), shrink) > 0) & ~box
    drawn = np.asarray(Image.open(workdir / report["keyed_frame"]).convert("RGBA"))[:, :, 3]
    assert drawn.shape == (OUT[1], OUT[0]) and off_person.mean() > 0.2 and on_person.mean() > 0.1
    transparent, opaque = float((drawn[off_person] == 0).mean()), float((drawn[on_person] == 255).mean())
    assert transparent >= 0.99 and opaque >= 0.99, f"transparent {transparent:.4f}, opaque {opaque:.4f}" + where

    print(
        f"\nframed 1280x720 in Chromium: received {report['received_fps']} fps, decoded {report['decoded_fps']} fps "
        f"({report['decode_ms_per_frame']} ms each, {report['dropped_frames']} dropped), "
        f"presented {presented_fps:.2f} fps "
        f"(rVFC: {watch['callbacks']} callbacks in {watch['seconds']:.1f} s, sizes {watch['sizes']}; "
        f"getVideoPlaybackQuality: {watch['quality_frames']} frames, {watch['quality_dropped']} 'dropped'), "
        f"codec {report['codec']}, remote peak RMS {watch['remote_level_peak']:.4f}, upload {report['upload_s']} s, "
        f"run {report['runtime_s']} s"
    )
    for f in figures:
        print(f"  {f}")
    print(f"  viewer &key=00ff00: off the person {transparent:.4f} transparent, on the person {opaque:.4f} opaque")
