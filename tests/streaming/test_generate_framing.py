"""`vexpress-rt generate --framing --background` (streaming/generate_additions.py, docs/framing.md "Offline"), as a
user runs it: real processes on the tiny random model, a whole photo as the reference image.

The photo is drawn here (a textured backdrop, a face, shoulders) at 480x360, with its key points given, so the
crop and the matte are those the live path makes of it (`crop_portrait`, `PortraitPhoto`). The expected pictures
are made from the photo and its matte with plain resizes, not with the composer: outside the crop box the frames
written must be the photo where the matte holds the person and the key colour where it does not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from kit.paths import pythonpath
from kit.tiny_model import SEED, portrait_image
from PIL import Image, ImageDraw

from streaming.framing import PortraitPhoto, parse_background_or_file
from streaming.generate_additions import FRAMING_ADDITION, PRODUCT_ADDITIONS
from streaming.portrait import crop_box
from vexpress_rt.cli import build_parser
from vexpress_rt.errors import InputError

CROP_W, CROP_H = 128, 64
SMALL = [
    "--image_width", str(CROP_W), "--image_height", str(CROP_H), "--context_frames", "12", "--context_overlap", "4",
    "--dtype", "fp32", "--device", "cpu", "--num_inference_steps", "1",
]  # fmt: skip
PHOTO_W, PHOTO_H = 480, 360  # 4:3 in a 16:9 canvas: scaled by 2 exactly, bars of 160 px left and right
CANVAS_W, CANVAS_H = 1280, 720
KEY = (0, 177, 64)
RUN_TIMEOUT_S = 400
FRAMING_ADDITION_PARSER = build_parser(generate_additions=[PRODUCT_ADDITIONS, FRAMING_ADDITION])


def _photo(root: Path) -> tuple[Path, Path]:
    """A presenter's photo (480x360 PNG) and its face's key points (JSON, photo pixels)."""
    rng = np.random.default_rng(SEED)
    base = rng.integers(40, 120, (PHOTO_H // 12, PHOTO_W // 12, 3), dtype=np.uint8)
    photo = Image.fromarray(base).resize((PHOTO_W, PHOTO_H), Image.Resampling.BICUBIC)
    ImageDraw.Draw(photo).polygon([(150, 250), (330, 250), (420, 360), (60, 360)], fill=(40, 60, 170))
    face = portrait_image(160)  # eyes at (52, 48), (76, 48), nose tip near (64, 65) of 128, scaled by 1.25
    mask = Image.new("L", face.size, 0)
    ImageDraw.Draw(mask).ellipse([35, 20, 125, 145], fill=255)
    photo.paste(face, (160, 90), mask)
    kps = [[225.0, 150.0], [255.0, 150.0], [240.0, 171.25]]
    photo.save(root / "photo.png")
    (root / "photo_kps.json").write_text(json.dumps(kps))
    return root / "photo.png", root / "photo_kps.json"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=pythonpath())
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip


@pytest.fixture(scope="module")
def case(model_dir, inputs_dir, tmp_path_factory):
    """The photo, and every run of this module started together (two generations, three refusals)."""
    root = tmp_path_factory.mktemp("generate_framing")
    photo, kps = _photo(root)

    def generate(name: str, *flags: str, output: str = ".mp4") -> list[str]:
        return [
            "generate", *SMALL, "--model_dir", str(model_dir), "--audio_path", str(inputs_dir / "audio.wav"),
            "--reference_image_path", str(photo), "--reference_kps_path", str(kps),
            "--output_path", str(root / f"{name}{output}"), "--frames_out", str(root / f"{name}.npy"), *flags,
        ]  # fmt: skip

    commands = {
        "key": generate("key", "--framing", "1280x720", "--background", "#00b140"),
        "transparent": generate("transparent", "--framing", "portrait", "--background", "transparent", output=".webm"),
        "bad_framing": generate("bad_framing", "--framing", "1280x720x2"),
        "bad_background": generate("bad_background", "--background", "green"),
        "transparent_mp4": generate("transparent_mp4", "--background", "transparent"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, args, root) for name, args in commands.items()}
        yield {"root": root, "photo": photo, "kps": kps, "runs": futures}
        for future in futures.values():
            future.cancel()


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def _expected(photo_path: Path, kps_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """(the photo in the 1280x720 canvas, its matte there, the crop box there as x0, y0, x1, y1): plain resizes."""
    photo = Image.open(photo_path).convert("RGB")
    kps = np.asarray(json.loads(kps_path.read_text()), np.float32)
    box = crop_box(kps, CROP_W, CROP_H)
    matte = PortraitPhoto.of(photo, box).matte()
    scale, left = CANVAS_H / PHOTO_H, (CANVAS_W - round(PHOTO_W * CANVAS_H / PHOTO_H)) // 2
    size = (round(PHOTO_W * scale), CANVAS_H)
    canvas = np.zeros((CANVAS_H, CANVAS_W, 3), np.uint8)
    canvas[:, left : left + size[0]] = cv2.resize(np.asarray(photo), size, interpolation=cv2.INTER_LINEAR)
    alpha = np.zeros((CANVAS_H, CANVAS_W), np.float32)
    alpha[:, left : left + size[0]] = cv2.resize(matte, size, interpolation=cv2.INTER_LINEAR)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    return canvas, alpha, (x0 + left, y0, x1 + left, y1)


def _decode(path: Path, codec: str | None = None, pixel_format: str = "rgb24") -> tuple[str, np.ndarray]:
    """(the stream's codec, every frame): `codec` names a decoder (libvpx-vp9 reads VP9's alpha, FFmpeg's own
    vp9 decoder drops it)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        name = stream.codec_context.name
        if codec is None:
            frames = [f.to_ndarray(format=pixel_format) for f in container.decode(stream)]
        else:
            decoder = av.CodecContext.create(codec, "r")
            frames = [f.to_ndarray(format=pixel_format) for p in container.demux(stream) for f in decoder.decode(p)]
    return name, np.stack(frames)


def test_a_key_colour_canvas_shows_the_photo_and_the_colour_outside_the_crop(case):
    result = _ok(case["runs"]["key"].result())
    assert "Framed 1280x720" in result.stdout and "ms per frame" in result.stdout
    codec, video = _decode(case["root"] / "key.mp4")
    written = np.load(case["root"] / "key.npy")
    assert codec == "h264" and video.shape[1:] == (CANVAS_H, CANVAS_W, 3)
    assert written.shape == video.shape and len(written) == 36

    canvas, matte, (x0, y0, x1, y1) = _expected(case["photo"], case["kps"])
    outside_box = np.ones((CANVAS_H, CANVAS_W), bool)
    outside_box[y0:y1, x0:x1] = False  # the blend band lies inside the box's border
    person = outside_box & (matte == 1.0)
    backdrop = outside_box & (matte == 0.0)
    assert person.mean() > 0.05 and backdrop.mean() > 0.3, (person.mean(), backdrop.mean())  # both are there
    assert backdrop[:, :160].all() and backdrop[:, -160:].all()  # the canvas's bars are the key colour too

    # the frames written, exactly: the photo's pixels on the person, the key colour elsewhere, on every frame
    assert np.array_equal(written[:, person], np.broadcast_to(canvas[person], written[:, person].shape))
    assert (written[:, backdrop] == KEY).all()
    # the video, within H.264's error (away from edges, where 4:2:0 chroma bleeds a pixel or two)
    kernel = np.ones((9, 9), np.uint8)
    deep_person = cv2.erode(person.astype(np.uint8), kernel).astype(bool)
    deep_backdrop = cv2.erode(backdrop.astype(np.uint8), kernel).astype(bool)
    person_error = np.abs(video[:, deep_person].astype(np.int16) - canvas[deep_person])
    key_error = np.abs(video[:, deep_backdrop].astype(np.int16) - np.array(KEY))
    assert person_error.mean() < 2.0 and np.percentile(person_error, 99) <= 8, person_error.mean()
    assert key_error.mean() < 2.0 and np.percentile(key_error, 99) <= 6, key_error.mean()

    # inside the box: the generated crop, which moves (the model's frames), while nothing outside it does
    inside = written[:, y0 + 8 : y1 - 8, x0 + 8 : x1 - 8].astype(np.int16)
    assert np.abs(np.diff(inside, axis=0)).mean() > 0.5
    assert not np.diff(written[:, outside_box].astype(np.int16), axis=0).any()


def test_a_transparent_portrait_is_a_webm_with_the_matte_as_alpha(case):
    result = _ok(case["runs"]["transparent"].result())
    assert f"Framed {PHOTO_W}x{PHOTO_H}" in result.stdout  # portrait: the photo's own size
    written = np.load(case["root"] / "transparent.npy")
    assert written.shape == (36, PHOTO_H, PHOTO_W, 4)
    codec, video = _decode(case["root"] / "transparent.webm", "libvpx-vp9", "rgba")
    assert codec == "vp9" and video.shape == written.shape
    with av.open(str(case["root"] / "transparent.webm")) as container:
        assert [s.codec_context.name for s in container.streams.audio] == ["opus"]  # the speech goes with it
        assert container.streams.video[0].metadata.get("alpha_mode") == "1"

    photo = np.asarray(Image.open(case["photo"]).convert("RGB"))
    kps = np.asarray(json.loads(case["kps"].read_text()), np.float32)
    box = crop_box(kps, CROP_W, CROP_H)
    matte = PortraitPhoto.of(Image.fromarray(photo), box).matte()
    outside_box = np.ones(photo.shape[:2], bool)
    bx0, by0, bx1, by1 = (round(v) for v in box)
    outside_box[max(0, by0) : by1, max(0, bx0) : bx1] = False
    # alpha: the matte (255 on the person, 0 on the backdrop) outside the box, as written and as decoded
    alpha = np.floor(matte[outside_box] * 255 + 0.5)
    assert (written[:, outside_box, 3] == alpha).all()
    assert (written[:, outside_box, :3] == photo[outside_box]).all()  # the colours: the photo's (alpha cuts it out)
    kernel = np.ones((5, 5), np.uint8)
    solid = cv2.erode((outside_box & (matte == 1.0)).astype(np.uint8), kernel).astype(bool)
    clear = cv2.erode((outside_box & (matte == 0.0)).astype(np.uint8), kernel).astype(bool)
    assert solid.any() and clear.any()
    assert (video[:, solid, 3] >= 250).mean() > 0.99 and (video[:, clear, 3] <= 5).mean() > 0.99


def _refused(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stderr


def test_bad_values_fail_with_the_options_message(case):
    err = _refused(case["runs"]["bad_framing"].result())
    assert 'argument --framing: framing must be "crop", "portrait" or "WxH"' in err and "1280x720x2" in err
    err = _refused(case["runs"]["bad_background"].result())
    assert 'argument --background: background must be "photo", "transparent", a colour "#rrggbb"' in err
    assert "'green'" in err
    err = _refused(case["runs"]["transparent_mp4"].result())
    assert "error: --background transparent: a .mp4 video cannot carry transparency" in err and ".webm" in err
    for name in ("bad_framing", "bad_background", "transparent_mp4"):
        assert not (case["root"] / f"{name}.mp4").exists()


def test_a_background_image_file_is_read_with_the_uploads_limits(tmp_path):
    studio = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    Image.fromarray(studio).save(tmp_path / "studio.png")
    background = parse_background_or_file(str(tmp_path / "studio.png"))
    assert background.kind == "image" and np.array_equal(background.image, studio)
    assert parse_background_or_file(" #00B140 ").color == KEY  # the API's values as they are
    with pytest.raises(InputError, match="no such file"):
        parse_background_or_file(str(tmp_path / "missing.png"))
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(InputError, match="the background image cannot be read"):
        parse_background_or_file(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize(
    "background, output, message",
    [
        ("transparent", "talk.avi", "a .avi video cannot carry transparency"),
        ("#00b140", "talk.webm", ".webm is written for --background transparent only"),
        ("#00b140", "talk.mov", ".mov is written for --background transparent only"),
    ],
)
def test_the_output_format_must_fit_the_background(tmp_path, background, output, message):
    """Checked first, before the photo is read or any weights load."""
    args = FRAMING_ADDITION_PARSER.parse_args(
        ["generate", "--background", background, "--output_path", str(tmp_path / output)]
    )
    with pytest.raises(InputError, match=re.escape(message)):
        FRAMING_ADDITION.framed_reference(args, tmp_path)
