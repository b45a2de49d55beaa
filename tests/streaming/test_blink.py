"""Blinking (docs/blink.md): the schedule keeps the asked rate, the eyelid closes real eyes as an independent
landmark model sees them, nothing outside the eyes changes, and live sessions and `generate` blink."""

from __future__ import annotations

import numpy as np
import pytest
from kit.skips import skip_or_fail
from PIL import Image

from streaming.blink_schedule import BlinkSchedule, blink_video
from streaming.eyelid import close_eyes, eye_boxes
from streaming.params import GenerationParams
from vexpress_rt.errors import InputError

FPS = 25


def _outside(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    mask = np.ones(image.shape[:2], bool)
    for box in eye_boxes(kps, image.shape[1], image.shape[0]):
        mask[box.y0 : box.y1, box.x0 : box.x1] = False
    return mask


# -- the schedule ----------------------------------------------------------------------------------------------------
def _blinks(closures: list[float]) -> list[tuple[int, int]]:
    """(first, last) frame of each run of frames with the eyes not open."""
    runs, start = [], None
    for i, c in enumerate([*closures, 0.0]):
        if c > 0 and start is None:
            start = i
        elif c == 0 and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


@pytest.mark.parametrize("rate", [0, 6, 10, 15, 20, 30, 60])
def test_schedule_keeps_the_rate_every_minute_with_short_random_blinks(rate):
    schedule = BlinkSchedule(rate, FPS, seed=7)
    closures = [schedule.closure(i) for i in range(3 * 60 * FPS)]  # three minutes
    runs = _blinks(closures)
    for minute in range(3):
        in_minute = [r for r in runs if minute * 60 * FPS <= r[0] < (minute + 1) * 60 * FPS]
        assert abs(len(in_minute) - rate) <= 1, (minute, len(in_minute))
    for first, last in runs:
        assert (last - first + 1) / FPS <= 0.3 + 1 / FPS  # 100-300 ms
        assert max(closures[first : last + 1]) == 1.0  # every blink is seen fully closed on a frame
    if rate >= 10:  # the intervals vary (not a metronome)
        peaks = [first + int(np.argmax(closures[first : last + 1])) for first, last in runs]
        gaps = np.diff(peaks)
        assert gaps.std() > 0.1 * gaps.mean()


def test_schedule_is_seeded_and_its_rate_changes_at_run_time():
    a, b, c = BlinkSchedule(20, FPS, seed=1), BlinkSchedule(20, FPS, seed=1), BlinkSchedule(20, FPS, seed=2)
    first = [a.closure(i) for i in range(60 * FPS)]
    assert first == [b.closure(i) for i in range(60 * FPS)]
    assert first != [c.closure(i) for i in range(60 * FPS)]
    a.set_rate(0, from_index=60 * FPS)
    assert not any(a.closure(i) for i in range(60 * FPS + 10, 120 * FPS))  # a blink under way may finish
    a.set_rate(30, from_index=120 * FPS)
    later = [a.closure(i) for i in range(120 * FPS, 180 * FPS)]
    assert abs(len(_blinks(later)) - 30) <= 1
    for bad in (-1, 61, float("nan"), "15", True):  # one validator: the control's, where the rate enters
        with pytest.raises(InputError, match="blinks_per_minute must be a finite number from 0 to 60"):
            GenerationParams(blinks_per_minute=bad)


# -- real photographs, an independent measure ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos():
    try:
        from streaming.bench.eyelid_photos import photos as load

        return load()
    except RuntimeError as exc:  # dlib or its models missing
        skip_or_fail(str(exc))


@pytest.mark.parametrize("rate", [0, 10, 20, 30])
def test_blinks_on_real_photographs_are_counted_by_dlibs_landmarks(photos, rate):
    """Over 60 s at 25 fps, on the astronaut and on Tom Hanks: dlib's 68-point eye aspect ratio counts the asked
    number of blinks (within 20 %, none at 0), drops clearly when closed, and nothing changes outside the eyes."""
    from streaming.bench.eyelid_photos import measure

    for photo in photos:
        figures = measure(photo, rate, seconds=60.0, fps=FPS, seed=3)
        assert abs(figures.counted - figures.requested) <= 0.2 * figures.requested, figures
        assert figures.max_change_outside_eyes == 0, figures
        if rate:
            assert figures.ear_closed < 0.7 * figures.ear_open, figures


def test_eyelid_closes_gradually_and_touches_only_the_eye_boxes(photos):
    from streaming.bench.eyelid_photos import EyeMeter

    for photo in photos:
        meter = EyeMeter(photo.image)
        ears = [meter.ear(close_eyes(photo.image, photo.kps, c)) for c in (0.0, 0.5, 1.0)]
        assert ears[0] > ears[1] > ears[2], (photo.name, ears)
        assert close_eyes(photo.image, photo.kps, 0.0) is photo.image
        shut = close_eyes(photo.image, photo.kps, 1.0)
        outside = _outside(photo.image, photo.kps)
        assert np.array_equal(shut[outside], photo.image[outside])
        boxes = eye_boxes(photo.kps, photo.image.shape[1], photo.image.shape[0])
        assert len(boxes) == 2 and sum((b.x1 - b.x0) * (b.y1 - b.y0) for b in boxes) < 0.05 * outside.size


# -- live sessions and the offline command ---------------------------------------------------------------------------
def test_live_session_blinks_on_idle_frames_and_the_control_at_zero_stops_it(tiny_models, tiny_portrait):
    """The blink rate is a live control like the others: `change_controls` (PATCH, the bot's `control`) is the one
    way to change it, and the frames shown follow it."""
    from streaming.engine import Engine, EngineConfig

    engine = Engine(tiny_models, EngineConfig(width=128, height=64, admission=False, idle_seconds=0.3))
    avatar = engine.add_avatar(*tiny_portrait).id  # a short idle clip (no audio here: every frame is idle)
    clock = [0.0]
    blinking = engine.open_session(avatar, now=lambda: clock[0])
    still = engine.open_session(avatar, now=lambda: clock[0])
    try:
        still.change_controls({"blinks_per_minute": 0})
        assert blinking.controls.params.blinks_per_minute == 15  # natural by default
        kps = blinking.avatar.encoded.reference_kps
        changed = 0
        for _ in range(6 * FPS):  # 15 a minute: one blink in 0.6-3.4 s, the next from 4.6 s
            a, b = blinking.read_frame(), still.read_frame()
            clock[0] += 1 / FPS
            outside = _outside(a.image, kps)
            assert np.array_equal(a.image[outside], b.image[outside])
            changed += not np.array_equal(a.image, b.image)
        assert 2 <= changed <= 2 * 8  # one or two blinks of 3-8 frames
    finally:
        blinking.close()
        still.close()
        engine.close()


def test_offline_frames_blink_at_each_frames_key_points():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (4 * FPS, 96, 128, 3), dtype=np.uint8)
    kps = np.array([[44, 40], [84, 42], [64, 62]], np.float32) + np.arange(len(frames))[:, None, None] * [0.2, 0]
    assert blink_video(frames, kps, 0, FPS) is frames  # off: the original's frames untouched
    out = blink_video(frames, kps, 60, FPS, seed=1)
    differs = [i for i in range(len(frames)) if not np.array_equal(out[i], frames[i])]
    assert 3 <= len(_blinks([float(i in differs) for i in range(len(frames))])) <= 5
    for i in differs:
        outside = _outside(frames[i], kps[i])
        assert np.array_equal(out[i][outside], frames[i][outside])


def test_generate_refuses_a_bad_rate(capsys):
    """`vexpress-rt generate --blinks_per_minute` (the product's flag: the model port's own `generate` has none),
    checked with the live control's one message."""
    from streaming.generate_additions import PRODUCT_ADDITIONS
    from streaming.params import field_error
    from vexpress_rt.cli import build_parser

    def parse(*args: str):
        return build_parser(generate_additions=[PRODUCT_ADDITIONS]).parse_args(["generate", *args])

    assert parse().blinks_per_minute == 0
    assert parse("--blinks_per_minute", "12").blinks_per_minute == 12
    with pytest.raises(SystemExit):
        parse("--blinks_per_minute", "61")
    assert field_error("blinks_per_minute", 61.0) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--blinks_per_minute", "12"])


def test_contact_sheet_is_small(tmp_path, photos):
    from streaming.bench.eyelid_photos import contact_sheet

    path = contact_sheet(tmp_path / "blink.png")
    assert path.stat().st_size < 200_000
    assert Image.open(path).size[0] == 720
