"""Live controls on the tiny model: pose follows the chosen motion exactly, procedural motions loop without a jump,
a change takes effect on the acknowledged frame and ramps, and sessions with different controls share UNet calls
and make the frames they make alone."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from kit.paths import REPO_ROOT
from PIL import Image

from streaming.controls import POSE, POSE_FADE_FRAMES, RAMP_FRAMES
from streaming.denoiser import StreamDenoiser
from streaming.engine import Engine, EngineConfig
from streaming.generate_additions import PRODUCT_ADDITIONS
from streaming.motion import PROCEDURAL_MOTIONS, motion_sequence, ping_pong, procedural_track
from streaming.params import GenerationParams
from streaming.session import IDLE, SessionConfig
from vexpress_rt.cli import build_parser
from vexpress_rt.errors import InputError
from vexpress_rt.kps import draw_v_kps_image, load_kps_sequence, retarget
from vexpress_rt.pipeline import kps_features

W, H = 128, 64
DOCS = REPO_ROOT / "docs"


@pytest.fixture(scope="module")
def engine(tiny_models):
    config = EngineConfig(
        width=W,
        height=H,
        admission=False,
        idle_seconds=0.32,
        default_session=SessionConfig(params=GenerationParams(steps=2)),
    )
    engine = Engine(tiny_models, config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def avatar(engine, tiny_portrait) -> str:
    return engine.add_avatar(*tiny_portrait).id


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """Wraps StreamDenoiser.run: every speech frame's UNet inputs by (session, utterance, frame), and batch sizes."""

    def __init__(self, monkeypatch):
        self.rows: dict[tuple, dict[str, torch.Tensor]] = {}
        self.batches: list[int] = []
        real = StreamDenoiser.run

        def run(denoiser, jobs):
            self.batches.append(len(jobs))
            for job in jobs:
                for f, payload in enumerate(job.payloads):
                    if payload is not None and payload.utterance != IDLE:  # speech frames (live idle: Shown)
                        key = (id(job.state), payload.utterance, payload.number)
                        self.rows[key] = {name: r[f].clone() for name, r in job.rows.items()}
            return real(denoiser, jobs)

        monkeypatch.setattr(StreamDenoiser, "run", run)


def _open(engine, avatar, max_ready_s: float = 1.0, **params):
    clock = Clock()
    config = SessionConfig(params=GenerationParams(steps=2, **params), max_ready_s=max_ready_s)
    session = engine.open_session(avatar, config, now=clock)
    events: list = []
    session.add_listener(events.append)
    return session, clock, events


def _play(engine, sessions, pcm, on_frame=None, limit: int = 200):
    """Push `pcm` into every (session, clock, events) at once, then run the worker and read a frame per period until
    each has finished its utterance; returns each one's frames."""
    for session, _, _ in sessions:
        session.push_audio(pcm)
        session.end_utterance()
    frames: list[list] = [[] for _ in sessions]
    for tick in range(limit):
        for _ in range(50):
            if not engine.worker.turn():
                break
        for k, (session, clock, _) in enumerate(sessions):
            frames[k].append(session.read_frame())
            clock.t += 1 / session.config.fps
        if on_frame is not None:
            on_frame(tick)
        if all(any(e.type == "playback.finished" for e in ev) for _, _, ev in sessions):
            return frames
    raise AssertionError("the utterances never finished")


def _feature(models, points) -> torch.Tensor:
    return kps_features(models, draw_v_kps_image(H, W, points)[None])[0, :, 0]


# -- motions ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [m for m in PROCEDURAL_MOTIONS if m != "still"])
def test_a_procedural_motion_loops_without_a_jump(tiny_portrait, name):
    ref = tiny_portrait[1]
    track = procedural_track(name, ref, fps=25, seed=3)
    loop = len(track.table)
    points = np.stack([track.points(i) for i in range(2 * loop + 1)])
    assert np.array_equal(points[loop], points[0]) and np.array_equal(points[2 * loop], points[0])
    # No jump: across the seam (frame L-1 -> L) speed and acceleration are those of any other frame.
    steps = np.abs(np.diff(points, axis=0)).max(axis=(1, 2))
    accel = np.abs(np.diff(points, n=2, axis=0)).max(axis=(1, 2))
    assert steps.max() < 1.0  # pixels per frame in the 128x64 frame: smooth everywhere
    assert max(accel[loop - 2], accel[loop - 1]) <= accel[: loop - 2].max() + 1e-4
    assert np.ptp(points[:, 2, 1]) > 0.5 or np.ptp(points[:, 2, 0]) > 0.5  # it moves (pixels, 128x64 frame)
    other = procedural_track(name, ref, fps=25, seed=4)
    assert not np.array_equal(other.table, track.table)  # seeded
    scaled = np.stack([track.scaled(0.5).points(i) for i in range(loop)])
    assert np.allclose(scaled - scaled[0], 0.5 * (points[:loop] - points[0]), atol=1e-4)  # the amplitude knob
    assert np.array_equal(motion_sequence("still", ref, 5, 25)[4], np.asarray(ref, np.float32))


def test_the_pose_follows_an_uploaded_sequence_exactly(
    engine, avatar, inputs_dir, tiny_models, tiny_speech, monkeypatch
):
    """Each generated frame's pose feature is the guider's output for the offline retarget of the same sequence,
    played forth and back (after the fade from the idle pose)."""
    sequence = load_kps_sequence(inputs_dir / "kps.pth")
    motion = engine.add_motion(sequence)
    ref = np.asarray(engine.get_avatar(avatar).kps, np.float32)
    recorder = Recorder(monkeypatch)
    run = _open(engine, avatar, motion=motion, retarget_strategy="naive_retarget")
    try:
        _play(engine, [run], tiny_speech[:8000])
    finally:
        run[0].close()
    offline = retarget("naive_retarget", ref, sequence, len(sequence))
    numbers = sorted(number for _, _, number in recorder.rows)
    assert len(numbers) >= 12
    checked = 0
    for (_, _, number), rows in recorder.rows.items():
        if number < POSE_FADE_FRAMES:
            continue
        expected = _feature(tiny_models, offline[ping_pong(len(offline), number)])
        assert torch.equal(rows[POSE], expected), number
        checked += 1
    assert checked >= 4
    assert len({rows[POSE].sum().item() for rows in recorder.rows.values()}) > 3  # the pose does move


def test_the_delivered_frames_carry_their_pose(engine, avatar, tiny_speech):
    session, clock, events = _open(engine, avatar, motion="nod", motion_amplitude=2.0)
    delivered = []
    real = session.deliver
    session.deliver = lambda frames: delivered.extend(p.kps for p, _, _ in frames) or real(frames)  # type: ignore[method-assign]
    try:
        _play(engine, [(session, clock, events)], tiny_speech[:6400])
    finally:
        session.close()
    assert len(delivered) >= 10 and all(k.shape == (3, 2) for k in delivered)
    assert np.ptp(np.stack(delivered)[:, 2, 1]) > 0.5  # the nose moves


# -- live changes --------------------------------------------------------------------------------------------------
def test_a_change_takes_effect_on_the_acknowledged_frame_and_ramps(engine, avatar, tiny_speech, monkeypatch):
    recorder = Recorder(monkeypatch)
    # A short ready queue: generation keeps pace with playback, so the change lands mid-utterance.
    session, clock, events = _open(engine, avatar, max_ready_s=0.2, audio_attention_weight=3.0)
    changed = {}

    def change_mid_speech(tick: int) -> None:
        if not changed and any(e.type == "playback.started" for e in events):
            changed["tick"] = tick
            changed["change"] = session.change_controls({"audio_attention_weight": 0.5, "motion": "sway"})

    try:
        frames = _play(engine, [(session, clock, events)], tiny_speech[:16000], on_frame=change_mid_speech)[0]
        with pytest.raises(InputError, match="cannot change steps"):
            session.change_controls({"steps": 3})
        with pytest.raises(InputError, match="audio_attention_weight"):
            session.change_controls({"audio_attention_weight": 11})
    finally:
        session.close()
    assert changed["change"].version == 1
    acks = [e for e in events if e.type == "control.applied"]
    assert [e.data["version"] for e in acks] == [1]
    speech = [f for f in frames if f.speaking]
    ack_frame = acks[0].frame_index
    weights = {number: rows["audio_attention_weight"].item() for (_, _, number), rows in recorder.rows.items()}
    shown = [k for k, f in enumerate(speech)]  # speech frame k plays payload number k (nothing skipped)
    first = next(k for k, f in enumerate(speech) if f.index == ack_frame)
    assert first in shown and weights[first - 1] == pytest.approx(3.0)  # the frame before: the old strength
    ramp = [weights[first + i] for i in range(RAMP_FRAMES)]
    assert ramp == pytest.approx([3.0 + (0.5 - 3.0) * (i + 1) / RAMP_FRAMES for i in range(RAMP_FRAMES)])
    assert all(weights[k] == pytest.approx(0.5) for k in weights if k >= first + RAMP_FRAMES - 1)
    assert session.controls.params.motion == "sway"


def test_a_change_while_idle_is_acknowledged_on_the_next_frame(engine, avatar):
    session, clock, events = _open(engine, avatar)
    try:
        session.read_frame()
        session.change_controls({"blinks_per_minute": 40})
        frame = session.read_frame()
        with pytest.raises(InputError, match="cannot turn guidance on or off"):
            session.change_controls({"guidance_scale": 2.0})
    finally:
        session.close()
    acks = [e for e in events if e.type == "control.applied"]
    assert [(e.data["version"], e.frame_index) for e in acks] == [(1, frame.index)]
    assert session.controls.params.blinks_per_minute == 40


# -- idle follows the motion ---------------------------------------------------------------------------------------
class Shown:
    """Which generated frame each output image is: the delivered images by content."""

    def __init__(self, session):
        self.made: dict[bytes, object] = {}
        real = session.deliver

        def deliver(frames):
            for payload, image, _ in frames:
                self.made[image.tobytes()] = payload
            real(frames)

        session.deliver = deliver  # type: ignore[method-assign]

    def payload(self, frame):
        return self.made.get(frame.image.tobytes())


def _tick(engine, session, clock):
    for _ in range(50):
        if not engine.worker.turn():
            break
    frame = session.read_frame()
    clock.t += 1 / session.config.fps
    return frame


def test_idle_frames_follow_the_motion_and_go_on_from_speech(engine, avatar, tiny_portrait, tiny_speech):
    """With a motion, idle frames are generated live (silence-driven) on the motion's clock: before speech, after it
    without going back to the fix_face clip, and through the change back to fix_face, which returns to the clip."""
    session, clock, events = _open(engine, avatar, motion="nod", motion_amplitude=2.0, blinks_per_minute=0)
    shown = Shown(session)
    clip = {image.tobytes() for image in session.avatar.idle_frames[session.config.decoder]}
    track = procedural_track("nod", engine.get_avatar(avatar).kps, fps=25, seed=0).scaled(2.0)
    try:
        before = [_tick(engine, session, clock) for _ in range(30)]
        assert session.stats()["idle"] == "live" and engine.stats()["live_idle_sessions"] == 1
        frames = _play(engine, [(session, clock, events)], tiny_speech[:6400])[0]
        after = [_tick(engine, session, clock) for _ in range(20)]
        session.change_controls({"motion": "fix_face"})
        back = [_tick(engine, session, clock) for _ in range(40)]
        assert session.stats()["idle"] == "clip" and engine.stats()["live_idle_sessions"] == 0
    finally:
        session.close()

    # Before any speech: after the first chunk's latency, every idle frame is a live one, on the motion's clock
    # (frame k of the session is the track's frame k once the fade from the portrait's pose is over).
    live = [shown.payload(f) for f in before]
    first = next(k for k, p in enumerate(live) if p is not None)
    assert first <= 10 and all(p is not None and p.utterance == 0 for p in live[first + 1 :])
    faded = [p for p in live if p is not None and p.number >= POSE_FADE_FRAMES]
    assert len(faded) >= 10
    for p in faded:
        assert np.array_equal(p.kps, track.points(p.number)), p.number
    assert np.ptp(np.stack([p.kps for p in faded])[:, 2, 1]) > 0.5  # the nose moves while idle
    assert len({f.image.tobytes() for f in before[first + 1 :]}) == len(before) - first - 1  # no frame repeats

    # Speech continues the same stream; the idle frames after it are live again, with no return to the clip, and
    # the pose goes on smoothly across both boundaries.
    sequence = [shown.payload(f) for f in before[first + 1 :] + frames + after]
    assert all(p is not None for p in sequence[-15:]) and all(p.utterance == 0 for p in sequence[-15:])
    assert not any(f.image.tobytes() in clip for f in frames + after)
    points = np.stack([p.kps for p in sequence if p is not None])
    steps = np.abs(np.diff(points, axis=0)).max(axis=(1, 2))
    track_step = np.abs(np.diff(track.table, axis=0)).max()
    # frames made before the speech and not shown are skipped: at most jitter + one chunk of motion
    assert steps.max() <= (session.config.jitter_frames + 3) * track_step + 1e-3

    # Back to fix_face: ramped, then the idle clip again (cross-faded), and no more generation while idle.
    assert any(f.image.tobytes() in clip for f in back[-10:])
    assert all(f.image.tobytes() in clip for f in back[-5:])
    assert not session.controls.posed


def test_after_an_interrupt_live_idle_starts_again(engine, avatar, tiny_speech):
    """Barge-in on a moving session: what was in flight is dropped, and idle frames are live again (a fresh
    stream, faded in from the clip), none of them from the interrupted utterance."""
    session, clock, events = _open(engine, avatar, motion="sway", blinks_per_minute=0)
    shown = Shown(session)
    try:
        session.push_audio(tiny_speech[:16000])
        session.end_utterance()
        ticks = 0
        while not any(e.type == "playback.started" for e in events) and ticks < 100:
            _tick(engine, session, clock)
            ticks += 1
        assert ticks < 100
        _tick(engine, session, clock)
        session.interrupt()
        after = [_tick(engine, session, clock) for _ in range(30)]
    finally:
        session.close()
    assert not any(f.speaking for f in after)
    tail = [shown.payload(f) for f in after[-10:]]
    assert all(p is not None and p.utterance == 0 for p in tail)
    assert [e.data["interrupted"] for e in events if e.type == "playback.finished"] == [True]


def test_a_fix_face_session_idles_on_the_clip_without_generating(engine, avatar):
    session, clock, _ = _open(engine, avatar, blinks_per_minute=0)
    clip = {image.tobytes() for image in session.avatar.idle_frames[session.config.decoder]}
    try:
        made = engine.worker.frames_generated
        frames = [_tick(engine, session, clock) for _ in range(12)]
        assert engine.worker.frames_generated == made
        assert all(f.image.tobytes() in clip for f in frames)
    finally:
        session.close()


# -- batching ------------------------------------------------------------------------------------------------------
def test_sessions_with_different_controls_batch_and_equal_unbatched(engine, avatar, tiny_speech, monkeypatch):
    specs = [
        dict(seed=1, audio_attention_weight=3.0),
        dict(seed=2, audio_attention_weight=1.0, reference_attention_weight=0.7, motion="lively"),
    ]
    pcm = tiny_speech[:6400]

    def play(chosen):
        recorder = Recorder(monkeypatch)
        runs = [_open(engine, avatar, **spec) for spec in chosen]
        try:
            frames = _play(engine, runs, pcm)
        finally:
            for session, _, _ in runs:
                session.close()
        return [np.stack([f.image for f in fs if f.speaking]) for fs in frames], recorder.batches

    together, batches = play(specs)
    assert max(batches) == 2  # different strengths and poses share UNet calls
    assert np.abs(together[0].astype(int) - together[1].astype(int)).mean() > 5
    for spec, batched in zip(specs, together):
        alone, alone_batches = play([spec])
        assert max(alone_batches) == 1 and alone[0].shape == batched.shape
        assert np.abs(alone[0].astype(int) - batched.astype(int)).max() <= 2


# -- offline generate --motion, and the motions' contact sheet (docs/controls.md) -------------------------------------
def test_generate_takes_a_built_in_motion_and_checks_its_amplitude(capsys):
    """`vexpress-rt generate --motion nod --motion_amplitude A` (the drawn key points are `motion_sequence`'s, tested
    above); a bad amplitude fails at parsing with the field's one message, as the HTTP API answers it. The flags are
    the product's (streaming/generate_additions.py): the model port's own `generate` has the original's only."""

    def parse(*args: str):
        return build_parser(generate_additions=[PRODUCT_ADDITIONS]).parse_args(["generate", *args])

    args = parse("--motion", "nod", "--motion_amplitude", "2.5")
    assert (args.motion, args.motion_amplitude) == ("nod", 2.5)
    assert parse().motion is None  # the original's retarget flags by default
    for bad in (["--motion_amplitude", "9"], ["--motion", "dance"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    assert "motion_amplitude must be a finite number from 0 to 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (--motion alone would abbreviate the original's --motion_module_path)
        build_parser().parse_args(["generate", "--motion_amplitude", "2"])


def test_contact_sheet_of_the_motions(tiny_portrait, tmp_path):
    """The V-Kps pose image of 8 frames over one loop of each built-in motion (amplitude 2, to be seen at 128x64):
    docs/controls_motions.png, rewritten when VEXPRESS_WRITE_DOCS=1."""
    ref = tiny_portrait[1]
    rows = []
    for name in PROCEDURAL_MOTIONS:
        track = procedural_track(name, ref, fps=25, seed=0).scaled(2.0)
        loop = len(track.table)
        tiles = [draw_v_kps_image(H, W, track.points(i * loop // 8)) for i in range(8)]
        rows.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=90) for t in tiles], axis=1))
    sheet = np.concatenate(rows, axis=0)
    assert sheet.shape == (len(PROCEDURAL_MOTIONS) * (H + 2), 8 * (W + 2), 3)
    still, moving = rows[0], rows[-1]
    assert all(np.array_equal(still[:, : W + 2], still[:, k * (W + 2) : (k + 1) * (W + 2)]) for k in range(8))
    assert len({moving[:, k * (W + 2) : (k + 1) * (W + 2)].tobytes() for k in range(8)}) == 8
    target = DOCS / "controls_motions.png" if os.environ.get("VEXPRESS_WRITE_DOCS") == "1" else tmp_path / "sheet.png"
    Image.fromarray(sheet).save(target, optimize=True)
