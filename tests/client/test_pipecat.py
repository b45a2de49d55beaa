"""`VExpressVideoService` in a real Pipecat pipeline against the server as `serve` runs it, on 127.0.0.1.

The pipeline is the framework's own (`PipelineWorker`, `WorkerRunner`): a TTS stand-in (espeak-ng speech queued as
`TTSStartedFrame`, 20 ms `TTSAudioRawFrame`s at 22.05 kHz, `TTSStoppedFrame`), the service, and a sink processor that
records every frame that comes out with its arrival time. The server runs the tiny random model at 128x64, 1 step,
25 fps, without admission control (2 CI cores cannot run it in real time: the session then plays hold frames, the
face with silent audio marked speaking, while generation catches up; they are told apart by their exact silence,
the speech being dithered so that none of its frames is exactly silent).

Checked: the speech comes out as one image + one 1/fps audio chunk per frame, as many speech frames as the speech
lasts at the session fps (within 2), carrying the speech that went in (correlation > 0.9 after resampling); idle
frames flow before and after; an `InterruptionFrame` mid-utterance is followed by no speech frame and then idle
frames with silent audio; a server killed mid-session ends the pipeline with an `ErrorFrame` within a bounded wait.
The latency the service adds (first TTS audio in -> first speech pair out, minus the same measured by a bare
websocket client on the same server) is printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from kit import tiny_model
from kit.http_calls import create_session, delete_session
from kit.http_calls import http as open_http
from kit.netns_browser import start_serve, stop, wait_ready
from kit.paths import REPO_ROOT
from kit.served import ServerThread, make_config
from kit.skips import skip_or_fail
from kit.waits import free_port, run
from kit.ws_clients import Bot, Frames
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from vexpress_rt.media import resample_pcm
from vexpress_rt_client import SessionOptions
from vexpress_rt_client.pipecat import VExpressVideoService

pytestmark = pytest.mark.timeout(300)

WIDTH, HEIGHT, FPS, STEPS = 128, 64, 25, 1
OUT_RATE = 48000
SPF = OUT_RATE // FPS
TTS_RATE = 22050  # what espeak-ng speaks; the session declares 16 kHz, so the service resamples
CHUNK = TTS_RATE // 50  # 20 ms
SERVER_START_TIMEOUT_S = 60
TEXT = "Hello there. This is a test of the streaming avatar, speaking through a Pipecat pipeline."


# -- the server ---------------------------------------------------------------------------------------------------
def served_config(model_dir: Path):
    """What `vexpress-rt serve --model_dir ... --fps 25 --steps 1 --no_admission --device cpu` serves."""
    return make_config(model_dir=str(model_dir), fps=FPS, steps=STEPS, admission=False, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(model_dir):
    """The server as `serve` runs it (server/serving/inprocess.py; the engine built from the settings), in a thread."""
    served = ServerThread(served_config(model_dir), None).start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """espeak-ng speech at 22.05 kHz, int16, dithered (no 40 ms stretch of it is exactly silent)."""
    voice = tiny_model.espeak_voice(TEXT, rate=TTS_RATE, seconds=3.0)
    if voice is None:
        skip_or_fail("espeak-ng is not installed (apt-get install espeak-ng)")
    dither = np.random.default_rng(0).normal(0, 0.002, len(voice))
    return np.clip(np.round((voice + dither) * 32767), -32768, 32767).astype(np.int16)


# -- the pipeline ---------------------------------------------------------------------------------------------------
@dataclass
class Out:
    at: float
    frame: Frame


@dataclass
class Pair:
    """One frame of the avatar as it came out: its image and its audio."""

    at: float
    index: int
    speaking: bool
    image: OutputImageRawFrame
    audio: np.ndarray

    @property
    def hold(self) -> bool:  # the engine's "catching up" frame: the face held, exact silence
        return self.speaking and not self.audio.any()


class Recorder(FrameProcessor):
    """The sink: keeps every frame that comes out of the service (with its arrival time) and passes it on."""

    def __init__(self):
        super().__init__()
        self.out: list[Out] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.out.append(Out(time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def pairs(self, since: int = 0) -> list[Pair]:
        """Image + audio pairs, in order, from `self.out[since:]` (an image must be followed by its audio)."""
        pairs, image = [], None
        for o in self.out[since:]:
            if isinstance(o.frame, OutputImageRawFrame):
                assert image is None, "two images without audio between them"
                image = o.frame
            elif isinstance(o.frame, SpeechOutputAudioRawFrame):
                assert image is not None, "audio without its image"
                meta = o.frame.metadata["vexpress"]
                assert meta == image.metadata["vexpress"], "image and audio of different frames"
                audio = np.frombuffer(o.frame.audio, dtype="<i2")
                pairs.append(Pair(o.at, meta["frame"], meta["speaking"], image, audio))
                image = None
        return pairs

    def index_of(self, kind: type) -> int | None:
        return next((i for i, o in enumerate(self.out) if isinstance(o.frame, kind)), None)


@dataclass
class Bot_:
    service: VExpressVideoService
    recorder: Recorder
    worker: PipelineWorker
    errors: list[ErrorFrame] = field(default_factory=list)
    run: asyncio.Task | None = None

    @classmethod
    async def start(cls, url: str, **service_kw) -> Bot_:
        service = VExpressVideoService(url=url, options=SessionOptions(fps=FPS, jpeg_quality=90), **service_kw)
        recorder = Recorder()
        worker = PipelineWorker(
            Pipeline([service, recorder]),
            params=PipelineParams(audio_out_sample_rate=OUT_RATE),
            idle_timeout_secs=None,
            enable_rtvi=False,
            enable_turn_tracking=False,
        )
        bot = cls(service, recorder, worker)

        @worker.event_handler("on_pipeline_error")
        async def on_error(_worker, frame: ErrorFrame):
            bot.errors.append(frame)

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        bot.run = asyncio.ensure_future(runner.run())
        await bot.wait(lambda: len(recorder.pairs()) >= 3, 30, "idle frames before any speech")
        return bot

    async def say(self, pcm: np.ndarray) -> float:
        """Queue an utterance as a TTS service would (faster than real time); returns when its audio went in."""
        frames: list[Frame] = [TTSStartedFrame()]
        for i in range(0, len(pcm), CHUNK):
            frames.append(TTSAudioRawFrame(audio=pcm[i : i + CHUNK].tobytes(), sample_rate=TTS_RATE, num_channels=1))
        frames.append(TTSStoppedFrame())
        sent = time.monotonic()
        await self.worker.queue_frames(frames)
        return sent

    async def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            if self.run.done():
                raise AssertionError(f"the pipeline ended while waiting for {what}: {self.errors}")
            await asyncio.sleep(0.02)

    async def end(self) -> None:
        if not self.run.done():
            await self.worker.stop_when_done()
            await asyncio.wait_for(self.run, 30)


def speech_pairs(pairs: list[Pair]) -> list[Pair]:
    return [p for p in pairs if p.speaking and not p.hold]


def correlation(sent: np.ndarray, got: np.ndarray) -> tuple[float, int]:
    """Best normalised correlation of `got` (48 kHz) with `sent` (22.05 kHz) over lags of +-100 ms, and the lag."""
    ref = resample_pcm(sent[None].astype(np.float32) / 32768, TTS_RATE, OUT_RATE)[0]
    got = got.astype(np.float32) / 32768
    best = (-1.0, 0)
    for lag in range(-OUT_RATE // 10, OUT_RATE // 10 + 1, 24):
        a = ref[max(0, -lag) :]
        b = got[max(0, lag) :]
        n = min(len(a), len(b))
        if n < OUT_RATE // 2:
            continue
        c = float(np.corrcoef(a[:n], b[:n])[0, 1])
        best = max(best, (c, lag))
    c, lag = best
    for fine in range(lag - 24, lag + 25):  # refine to the sample
        a, b = ref[max(0, -fine) :], got[max(0, fine) :]
        n = min(len(a), len(b))
        best = max(best, (float(np.corrcoef(a[:n], b[:n])[0, 1]), fine))
    return best


async def bare_client_latency(url: str, pcm16k: np.ndarray) -> float:
    """The same measure without Pipecat: first PCM pushed on the bot websocket -> first speech frame received."""
    async with open_http(60) as http:
        session = await create_session(http, url, {"fps": FPS})
        bot = await Bot.connect(http, session)
        frames = await Frames.connect(http, session)
        try:
            await bot.wait_type("session.ready", timeout=15)
            deadline = time.monotonic() + 15
            while len(frames.frames) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            sent = time.monotonic()
            await bot.push(pcm16k.astype(np.float32) / 32768)
            await bot.send({"type": "audio.end"})
            deadline = time.monotonic() + 30
            while not [f for f in frames.speech() if f.audio.any()]:
                assert time.monotonic() < deadline, "no speech frame from the bare client's session"
                await asyncio.sleep(0.005)
            return [f for f in frames.speech() if f.audio.any()][0].at - sent
        finally:
            await bot.close()
            await frames.close()
            await delete_session(http, session)


# -- tests ----------------------------------------------------------------------------------------------------------
def test_speech_comes_out_paired_in_sync_and_whole(server, speech):
    async def main():
        bot = await Bot_.start(server.url)
        try:
            assert bot.service.session.ready["sample_rate"] == 16000  # 22.05 kHz TTS in: resampled by the service
            sent = await bot.say(speech)
            await bot.wait(lambda: speech_pairs(bot.recorder.pairs()), 60, "the first speech frame")
            first = speech_pairs(bot.recorder.pairs())[0].at
            # played to its end: idle frames after the last speech frame
            await bot.wait(
                lambda: (p := bot.recorder.pairs()) and any(x.speaking for x in p) and not p[-1].speaking
                and sum(1 for x in p[-5:] if not x.speaking) == 5,
                90, "the end of the utterance",
            )  # fmt: skip
            pairs = bot.recorder.pairs()
            assert not bot.errors, bot.errors
            assert not any(isinstance(o.frame, TTSAudioRawFrame) for o in bot.recorder.out), "TTS audio passed on"
            await bot.end()
        finally:
            if not bot.run.done():
                bot.run.cancel()
        bare = await bare_client_latency(server.url, resample_pcm(speech[None] / 32768, TTS_RATE, 16000)[0] * 32768)
        return sent, first, pairs, bare

    sent, first, pairs, bare = run(main(), 240)
    speech_frames = speech_pairs(pairs)
    expected = len(speech) / TTS_RATE * FPS
    corr, lag = correlation(speech, np.concatenate([p.audio for p in speech_frames]))
    indices = [p.index for p in pairs]
    print(
        f"\n[pipecat] {len(pairs)} pairs, {len(speech_frames)} speech frames for {len(speech) / TTS_RATE:.3f} s of "
        f"speech (= {expected:.1f} frames at {FPS} fps), {sum(p.hold for p in pairs)} hold frames; correlation "
        f"{corr:.4f} at lag {lag} samples; latency TTS audio in -> first speech pair out {1000 * (first - sent):.0f} ms"
        f", bare websocket client {1000 * bare:.0f} ms, added by the service {1000 * (first - sent - bare):.0f} ms"
    )
    assert all(p.audio.size == SPF for p in pairs), "every frame carries exactly 1/fps of audio"
    assert all(p.image.size == (WIDTH, HEIGHT) and p.image.format == "RGB" for p in pairs)
    assert all(p.image.sync_with_audio for p in pairs), "images are queued with their audio"
    assert indices == sorted(indices) and len(set(indices)) == len(indices), "frames in order, none twice"
    assert not pairs[0].speaking and not pairs[-1].speaking, "idle frames flow before and after the turn"
    assert abs(len(speech_frames) - expected) <= 2, (len(speech_frames), expected)
    assert corr > 0.9, corr


def test_interruption_stops_speech_within_a_frame(server, speech):
    async def main():
        bot = await Bot_.start(server.url)
        try:
            await bot.say(np.concatenate([speech, speech]))  # ~6 s
            await bot.wait(lambda: len(speech_pairs(bot.recorder.pairs())) >= 10, 90, "10 speech frames")
            await bot.worker.queue_frame(InterruptionFrame())
            await bot.wait(lambda: bot.recorder.index_of(InterruptionFrame) is not None, 10, "the interruption")
            cut = bot.recorder.index_of(InterruptionFrame)
            await bot.wait(lambda: len(bot.recorder.pairs(cut)) >= 2 * FPS, 30, "2 s of frames after it")
            pairs, after = bot.recorder.pairs(), bot.recorder.pairs(cut)
            before = pairs[: len(pairs) - len(after)]
            assert not bot.errors, bot.errors
            await bot.end()
            return before, after
        finally:
            if not bot.run.done():
                bot.run.cancel()

    before, after = run(main(), 240)
    spoken_after = [p for p in after if p.speaking]
    print(
        f"\n[pipecat] interrupted after {len(speech_pairs(before))} speech frames; after the InterruptionFrame: "
        f"{len(spoken_after)} speech frames, then {len(after)} frames, silent: {all(not p.audio.any() for p in after)}"
    )
    assert len(spoken_after) <= 1, [p.index for p in spoken_after]
    assert all(not p.speaking and not p.audio.any() for p in after[1:]), "idle frames with silent audio follow"
    # Video keeps flowing: past the one frame the cut may leave, every frame comes, in order, none skipped
    idle = [p.index for p in after[1:]]
    assert idle == list(range(idle[0], idle[0] + len(idle))), f"frames skipped or out of order after the cut: {idle}"


def test_server_gone_ends_pipeline_with_error(model_dir, tmp_path, speech):
    """A server process killed (SIGKILL: no goodbye on any socket) mid-utterance."""
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    served = start_serve(model_dir, port, log, "--fps", str(FPS), "--steps", str(STEPS))

    async def main():
        bot = await Bot_.start(url, frame_timeout_s=3.0)
        try:
            await bot.say(speech)
            served.send_signal(signal.SIGKILL)
            served.wait(timeout=10)
            killed = time.monotonic()
            await asyncio.wait_for(asyncio.shield(bot.run), 20)  # ends by itself: no EndFrame queued here
            return bot, time.monotonic() - killed
        finally:
            if not bot.run.done():
                bot.run.cancel()

    try:
        wait_ready(url, served, log, SERVER_START_TIMEOUT_S)
        bot, took = run(main(), 120)
    finally:
        stop(served)
    print(f"\n[pipecat] server killed: pipeline ended after {took:.2f} s with {[e.error for e in bot.errors]}")
    assert any(e.processor is bot.service and "vexpress-rt" in e.error for e in bot.errors), bot.errors
    assert not bot.service.is_usable


def test_unreachable_server_ends_pipeline_with_error():
    """A wrong URL (nothing listens there) is an ErrorFrame and the end of the pipeline, not a hang."""

    async def main():
        service = VExpressVideoService(url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=5.0)
        worker = PipelineWorker(Pipeline([service, Recorder()]), idle_timeout_secs=None, enable_rtvi=False)
        errors: list[ErrorFrame] = []

        @worker.event_handler("on_pipeline_error")
        async def on_error(_worker, frame: ErrorFrame):
            errors.append(frame)

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await asyncio.wait_for(runner.run(), 20)
        return service, errors

    service, errors = run(main(), 60)
    assert any(e.processor is service and "could not open a session" in e.error for e in errors), errors


def test_example_bot_imports():
    """examples/pipecat_bot.py builds its pipeline pieces from the installed Pipecat (no network, no API key)."""
    spec = importlib.util.spec_from_file_location("pipecat_bot", REPO_ROOT / "examples" / "pipecat_bot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = module.transport_params()
    assert params.video_out_enabled and not params.video_out_is_live and params.video_out_framerate == module.FPS
    assert isinstance(module.avatar(), VExpressVideoService)
