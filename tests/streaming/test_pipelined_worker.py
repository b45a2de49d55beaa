"""The pipelined model worker (streaming/finisher.py): decode, host copy and delivery on a second thread while the
worker runs the next turn. On CUDA it is the default; here (tiny model, 128 x 64, CPU) it is switched on with
`EngineConfig(pipelined=True)` so that CI runs its code path.

What a user would notice if it were wrong: other frames or events than the serial worker's, frames in the wrong
order, frames reaching a session after it closed, one session's decoder failure ending the others, a thread
left running after the engine closed.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from kit.fake_clock import FakeClock

from streaming import finisher as finisher_module
from streaming import worker as worker_module
from streaming.decoder import FrameDecoder
from streaming.device import bind_thread
from streaming.engine import Engine, EngineConfig
from streaming.finisher import DeviceClock, Finisher
from streaming.params import GenerationParams
from streaming.session_config import SessionConfig
from vexpress_rt.pipeline import VAE_SCALE

W, H = 128, 64
THREADS = ("vexpress-model-worker", "vexpress-finisher")
WAIT_S = 20.0  # bound on every wait below


def _engine(models, pipelined: bool, decoders=None) -> Engine:
    config = EngineConfig(
        width=W,
        height=H,
        admission=False,
        idle_seconds=0.64,
        default_session=SessionConfig(params=GenerationParams(steps=2)),
        pipelined=pipelined,
    )
    return Engine(models, config, decoders)


@pytest.fixture(scope="module")
def engines(tiny_models, tiny_portrait):
    """A serial and a pipelined engine on the same models, the same avatar registered on both."""
    made = {mode: _engine(tiny_models, mode == "pipelined") for mode in ("serial", "pipelined")}
    avatars = {mode: engine.add_avatar(*tiny_portrait).id for mode, engine in made.items()}
    yield made, avatars
    for engine in made.values():
        engine.close()


def _pump(engine: Engine) -> None:
    """The worker catches up: turns until it has nothing to do, then everything handed over is delivered."""
    for _ in range(500):
        if not engine.worker.turn():
            break
    else:
        raise AssertionError("the worker never runs out of work")
    assert engine.worker.drain(WAIT_S)


def _speak_together(engine: Engine, avatar_id: str, specs, strategy: str = "staggered", decoders=None) -> list[dict]:
    """One session per (seed, pcm) on a fake clock, everything pushed at once; then frame periods: the worker
    catches up, each session reads one frame. Returns per session its frames and events."""
    clock = FakeClock()
    runs = []
    for i, (seed, pcm) in enumerate(specs):
        params = GenerationParams(steps=2, seed=seed, strategy=strategy)
        config = SessionConfig(params=params, decoder=decoders[i] if decoders else "full")
        session = engine.open_session(avatar_id, config, now=clock)
        events: list = []
        session.add_listener(events.append)
        session.push_audio(pcm)
        session.end_utterance()
        runs.append({"session": session, "events": events, "frames": []})
    try:
        for period in range(200):
            _pump(engine)
            for run in runs:
                if not run["session"].closed:
                    run["frames"].append(run["session"].read_frame())
            clock.t = 1000.0 + (period + 1) / 25
            done = [r["session"].closed or any(e.type == "playback.finished" for e in r["events"]) for r in runs]
            if all(done):
                break
        else:
            raise AssertionError("the utterances never finished")
    finally:
        for run in runs:
            run["session"].close()
    return runs


def _events(run: dict) -> list[tuple]:
    return [(e.type, e.data, e.frame_index) for e in run["events"]]


@pytest.mark.parametrize("strategy", ["staggered", "chunked"])
def test_pipelined_frames_and_events_equal_the_serial_ones(engines, tiny_speech, strategy):
    made, avatars = engines
    specs = [(11, tiny_speech[:7680]), (12, tiny_speech[::-1][:5760].copy())]  # 0.48 s and 0.36 s, batched
    if strategy == "chunked":
        specs = specs[:1]
    results = {}
    for mode, engine in made.items():
        results[mode] = _speak_together(engine, avatars[mode], specs, strategy)
    for serial, pipelined, (_, pcm) in zip(results["serial"], results["pipelined"], specs):
        speech = [np.stack([f.image for f in r["frames"] if f.speaking]) for r in (serial, pipelined)]
        assert len(speech[0]) == int(np.ceil(len(pcm) / 640))
        assert np.array_equal(speech[0], speech[1])  # bitwise, in the same order
        assert [f.index for f in pipelined["frames"]] == [f.index for f in serial["frames"]]
        assert np.array_equal(
            np.concatenate([f.audio for f in serial["frames"]]), np.concatenate([f.audio for f in pipelined["frames"]])
        )
        assert _events(pipelined) == _events(serial)
    # the cost admission reads was measured on the pipelined calls too, at the batch size they ran
    worker = made["pipelined"].worker
    settings = SessionConfig(params=GenerationParams(steps=2, strategy=strategy)).denoiser_settings()
    assert {b for s, b in worker.costs.measured if s == settings} >= {len(specs)}
    assert worker.errors == 0


def test_a_session_closed_while_its_frames_are_finished_gets_nothing_after(engines, tiny_speech, monkeypatch):
    made, avatars = engines
    engine = made["pipelined"]
    entered, release = threading.Event(), threading.Event()
    real_decode = engine.decode

    def gated(latents, decoder=None):
        entered.set()
        release.wait(WAIT_S)
        return real_decode(latents, decoder)

    monkeypatch.setattr(engine, "decode", gated)
    session = engine.open_session(avatars["pipelined"], SessionConfig(params=GenerationParams(steps=2, seed=3)))
    events: list = []
    session.add_listener(events.append)
    session.push_audio(tiny_speech)
    session.end_utterance()
    try:
        for _ in range(50):  # the first turns feed the features, the window's first call makes fillers only
            engine.worker.turn()
            if not engine.worker.drain(0.5) or entered.is_set():  # not drained: held in the gated decode
                break
        assert entered.is_set(), "no frames reached the finisher"
        session.close()  # while its frames are being decoded
        closed_at = len(events)
    finally:
        release.set()
    assert engine.worker.drain(WAIT_S)
    assert session.stats()["ready_frames"] == 0 and session.latency_count == 0
    assert events[closed_at - 1].data == {"state": "closed"} and len(events) == closed_at
    assert engine.worker.errors == 0


@pytest.mark.parametrize("mode", ["serial", "pipelined"])
def test_a_decoder_failure_ends_only_its_session_as_before(tiny_models, tiny_portrait, tiny_speech, mode):
    """Two sessions share UNet calls; one decodes with a decoder that starts failing. It ends with the same
    `error` event in both modes; the other plays its utterance to the end."""

    class Breakable:
        """The full VAE, raising once armed."""

        armed = False

        def parameters(self):
            return tiny_models.vae.parameters()

        def decode(self, z):
            if self.armed:
                raise RuntimeError("injected decoder fault")
            return tiny_models.vae.decode(z)

    broken = Breakable()
    decoders = {"full": FrameDecoder.full(tiny_models), "tiny": FrameDecoder("tiny", broken, VAE_SCALE)}
    engine = _engine(tiny_models, mode == "pipelined", decoders)
    try:
        avatar = engine.add_avatar(*tiny_portrait).id
        broken.armed = True
        specs = [(1, tiny_speech[:9600]), (2, tiny_speech[:9600])]
        failing, healthy = _speak_together(engine, avatar, specs, decoders=["tiny", "full"])
        errors = engine.worker.errors
    finally:
        engine.close()
    assert [e.type for e in failing["events"]][-2:] == ["error", "state"]
    error = failing["events"][-2].data
    assert error == {"code": "model_error", "message": "generation failed: RuntimeError: injected decoder fault"}
    assert not any(f.speaking for f in failing["frames"])
    assert sum(f.speaking for f in healthy["frames"]) == 15
    assert [e.data["interrupted"] for e in healthy["events"] if e.type == "playback.finished"] == [False]
    assert not any(e.type == "error" for e in healthy["events"]) and errors == 1


def test_the_pipelined_worker_thread_serves_a_reader_and_stop_leaves_no_thread(engines, tiny_speech):
    made, avatars = engines
    engine = made["pipelined"]
    engine.worker.stop()  # the tests above drove it by hand: its finisher thread is running
    before = set(threading.enumerate())
    session = engine.open_session(avatars["pipelined"], SessionConfig(params=GenerationParams(steps=2)))
    events: list = []
    session.add_listener(events.append)
    engine.start()
    frames = []
    try:
        session.push_audio(tiny_speech)
        session.end_utterance()
        deadline = time.monotonic() + 60
        while not any(e.type == "playback.finished" for e in events) and time.monotonic() < deadline:
            frames.append(session.read_frame())
            time.sleep(0.04)
        # more audio, and the engine's worker stops while it works on it
        session.push_audio(tiny_speech)
        time.sleep(0.3)
    finally:
        engine.worker.stop()
        session.close()
    assert any(e.type == "playback.finished" for e in events), "the utterance never finished"
    assert engine.worker.errors == 0
    spoken = [f for f in frames if f.speaking and f.audio.any()]
    assert spoken and all(f.image.shape == (H, W, 3) for f in frames)
    indices = [f.index for f in frames]
    assert all(b > a for a, b in zip(indices, indices[1:]))
    assert not [t.name for t in threading.enumerate() if t not in before and t.name in THREADS and t.is_alive()]
    assert session.stats()["ready_frames"] == 0


def test_the_finisher_keeps_order_holds_one_call_and_survives_a_failing_one():
    cpu = torch.device("cpu")
    finisher, clock = Finisher(cpu, depth=1, name="test-finisher"), DeviceClock(cpu)
    gate, done = threading.Event(), []

    def held() -> None:
        gate.wait(WAIT_S)
        done.append(0)

    try:
        assert finisher.submit(held, clock.mark())
        t0 = time.monotonic()
        assert not finisher.submit(lambda: done.append(1), clock.mark(), timeout=0.3)  # full: refused in time
        assert time.monotonic() - t0 >= 0.3 and finisher.in_flight == 1
        threading.Timer(0.2, gate.set).start()
        assert finisher.submit(lambda: 1 / 0, clock.mark())  # taken once the first is done; it raises
        assert finisher.submit(lambda: done.append(2), clock.mark())
        assert finisher.drain(WAIT_S)
    finally:
        gate.set()
        finisher.stop()
    assert done == [0, 2] and finisher.errors == 1 and finisher.in_flight == 0
    assert not [t for t in threading.enumerate() if t.name == "test-finisher" and t.is_alive()]


def test_bind_thread_makes_the_engines_cuda_device_current(monkeypatch):
    """A new thread starts on cuda:0: its stream, events and allocations would go there for an engine on cuda:1
    (and a graph captured there records nothing). `bind_thread` sets the engine's device; elsewhere nothing."""
    set_to: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    bind_thread(torch.device("cuda:1"))
    bind_thread(torch.device("cpu"))
    bind_thread(torch.device("meta"))
    assert set_to == [torch.device("cuda:1")]


def test_the_worker_and_finisher_threads_bind_the_engines_device_first(tiny_models, monkeypatch):
    """Each thread that touches the device binds it before its first work: the worker's loop and the finisher's."""
    bound: list[tuple[str, torch.device]] = []
    ran: list[str] = []

    def record(device: torch.device) -> None:
        bound.append((threading.current_thread().name, torch.device(device)))

    monkeypatch.setattr(worker_module, "bind_thread", record)
    monkeypatch.setattr(finisher_module, "bind_thread", record)
    engine = _engine(tiny_models, pipelined=True)
    finisher = Finisher(tiny_models.device, name="test-bound-finisher")
    try:
        engine.start()
        deadline = time.monotonic() + WAIT_S
        while not bound and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finisher.submit(
            lambda: ran.append(f"ran after {len(bound)} bindings"), DeviceClock(tiny_models.device).mark()
        )
        assert finisher.drain(WAIT_S)
    finally:
        finisher.stop()
        engine.close()
    assert bound == [("vexpress-model-worker", tiny_models.device), ("test-bound-finisher", tiny_models.device)]
    assert ran == ["ran after 2 bindings"]  # the finisher bound its device before running the work
