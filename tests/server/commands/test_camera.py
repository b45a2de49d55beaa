"""`vexpress-rt camera` (issue 15 item 2): the session's frames into a virtual camera and its audio into a virtual
microphone, on a steady clock; a slow camera loses frames (counted) and never makes the picture drift late.

The pacing is driven into recording sinks (objects that keep what they were given and when) on a simulated clock
(exact tick times), then on the real clock, then end to end from a real server's frames websocket. The device
itself (v4l2loopback through pyvirtualcam) is not on this machine: the command must say how to set it up.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest
from kit.http_calls import bearer, create_session, delete_session, http
from kit.media_synth import wav_bytes
from kit.waits import run

from server import cli
from server.commands.camera import CameraFrame, FramePacer, MonotonicClock, StreamInfo, run_camera

pytestmark = [pytest.mark.timeout(120)]

FPS = 25
PERIOD = 1 / FPS
SPF = 48000 // FPS


def frame(index: int) -> CameraFrame:
    """A frame whose picture and audio both carry its index (the audio: index + 1, so silence is 0)."""
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0, :2] = divmod(index, 256)
    return CameraFrame(index, image, np.full(SPF, index + 1, np.int16), 48000)


def index_of(image: np.ndarray) -> int:
    return int(image[0, 0, 0]) * 256 + int(image[0, 0, 1])


class SimClock:
    """Simulated time: sleeping and sending move it; frames arrive as it passes their arrival times."""

    def __init__(self):
        self.t = 0.0
        self.arrivals: list[tuple[float, CameraFrame]] = []
        self.pacer: FramePacer | None = None

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.advance(max(0.0, t - self.t))

    def advance(self, dt: float) -> None:
        self.t += dt
        while self.arrivals and self.arrivals[0][0] <= self.t + 1e-9:
            self.pacer.put(self.arrivals.pop(0)[1])


class RecordingCamera:
    """A camera that keeps (time, frame index) of every send; a send costs `cost(n)` seconds of the clock."""

    def __init__(self, clock, cost=lambda n: 0.005):
        self.clock, self.cost = clock, cost
        self.sends: list[tuple[float, int]] = []
        self.closed = False

    def send(self, image: np.ndarray) -> None:
        self.sends.append((self.clock.now(), index_of(image)))
        cost = self.cost(len(self.sends))
        if isinstance(self.clock, SimClock):
            self.clock.advance(cost)
        else:
            time.sleep(cost)

    def close(self) -> None:
        self.closed = True


class RecordingMic:
    def __init__(self):
        self.writes: list[np.ndarray] = []
        self.closed = False

    def write(self, pcm: np.ndarray) -> bool:
        self.writes.append(np.array(pcm))
        return True

    def close(self) -> None:
        self.closed = True


def simulate(ticks: int, cost=lambda n: 0.005, arrivals=None, queue_frames: int = 4):
    clock = SimClock()
    camera, mic = RecordingCamera(clock, cost), RecordingMic()
    pacer = FramePacer(FPS, camera, mic, clock=clock, queue_frames=queue_frames)
    clock.pacer = pacer
    clock.arrivals = arrivals if arrivals is not None else [(k * PERIOD - 0.001, frame(k)) for k in range(ticks + 10)]
    clock.advance(0.0)
    stats = pacer.run(threading.Event(), max_ticks=ticks)
    return camera, mic, stats


def tick_of(t: float) -> float:
    return t / PERIOD


def test_frames_leave_on_the_clock_with_their_audio():
    camera, mic, stats = simulate(250)
    assert [round(tick_of(t), 6) for t, _ in camera.sends] == list(range(250))  # every 40 ms, on the dot
    assert [i for _, i in camera.sends] == list(range(250))  # frame k at tick k
    assert [int(w[0]) - 1 for w in mic.writes] == list(range(250)) and all(len(w) == SPF for w in mic.writes)
    assert (stats.sent, stats.dropped_late, stats.dropped_queue, stats.repeated) == (250, 0, 0, 0)


def test_a_slow_camera_drops_frames_and_never_drifts():
    """The camera takes 100 ms a frame for ticks 50-99 (2.5 periods), 5 ms otherwise."""
    camera, mic, stats = simulate(250, cost=lambda n: 0.1 if 50 <= n < 100 else 0.005)
    ticks = [tick_of(t) for t, _ in camera.sends]
    assert all(abs(t - round(t)) < 1e-6 for t in ticks), "a send left off the clock's grid"
    # What is sent at tick k is frame k: frames are dropped, never shown late
    assert all(round(t) == i for t, (_, i) in zip(ticks, camera.sends))
    slow = [round(t) for t in ticks if 50 <= round(t) < 150]
    assert stats.dropped_late > 60 and stats.sent + stats.dropped_late == 250, stats
    assert max(b - a for a, b in zip(slow, slow[1:])) == 3, "a 100 ms camera is fed every third tick"
    # Once the camera is fast again, every tick is sent, still on time
    assert [round(t) for t in ticks[-50:]] == list(range(200, 250))
    assert [int(w[0]) - 1 for w in mic.writes] == [i for _, i in camera.sends]  # each picture with its own audio


def test_missing_frames_repeat_the_picture_with_silence_and_a_burst_is_bounded():
    """Frames 100-111 are held up by the network and arrive together with frame 112."""
    arrivals = [(k * PERIOD - 0.001 if not 100 <= k < 112 else 112 * PERIOD - 0.001, frame(k)) for k in range(260)]
    camera, mic, stats = simulate(250, arrivals=arrivals)
    assert stats.repeated == 12 and stats.dropped_queue == 9, stats  # a queue of 4 keeps the 4 newest
    repeats = [i for (_, i), w in zip(camera.sends, mic.writes) if not w.any()]
    assert repeats == [99] * 12  # the last picture, with silence
    assert [round(tick_of(t), 6) for t, _ in camera.sends] == list(range(250))  # the clock went on
    late = [round(tick_of(t)) - i for t, i in camera.sends[120:]]
    assert max(late) <= 4, "after the burst the picture is at most the queue's length behind"


def test_pacing_on_the_real_clock():
    camera = RecordingCamera(MonotonicClock(), cost=lambda n: 0.002)
    pacer = FramePacer(FPS, camera, RecordingMic())
    stop = threading.Event()

    def produce():
        start = time.monotonic()
        for k in range(40):
            time.sleep(max(0.0, start + k * PERIOD - time.monotonic()))
            pacer.put(frame(k))
            if stop.is_set():
                return

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert pacer.wait_first(stop, timeout=5)
    t0 = time.monotonic()
    stats = pacer.run(stop, max_ticks=25)
    stop.set()
    producer.join(5)
    times = [t - t0 for t, _ in camera.sends]
    # Each send at (or just after) a tick of the grid: a loaded machine may wake late and skip a tick, never drift
    lateness = [t - math.floor(t / PERIOD + 1e-6) * PERIOD for t in times]
    assert stats.sent + stats.dropped_late == 25 and stats.dropped_late <= 3, stats
    assert max(lateness) < 0.03, f"sends late by up to {max(lateness) * 1000:.1f} ms"
    assert times[-1] < 25 * PERIOD, "the last frame left after the clock's 25th tick"


@pytest.mark.fixtures
def test_camera_from_a_live_session(serve):
    """A real server's frames websocket into recording devices: the session's size and fps, each frame with its
    1/fps of audio, the speech said through the API reaching the microphone."""
    server = serve()
    opened: dict = {}

    def open_video(info: StreamInfo):
        opened["video"] = info
        opened["camera"] = RecordingCamera(MonotonicClock(), cost=lambda n: 0.001)
        return opened["camera"]

    def open_audio(info: StreamInfo):
        opened["mic"] = RecordingMic()
        return opened["mic"]

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            frames_url = s["frames_url"]
            task = asyncio.ensure_future(run_camera(frames_url, s["token"], open_video, open_audio, max_frames=100))
            await asyncio.sleep(0.5)
            headers = {**bearer(s["token"]), "Content-Type": "audio/wav"}
            async with c.post(s["speak_url"], data=wav_bytes(2.0), headers=headers) as r:
                assert r.status == 202, await r.text()
            t0 = time.monotonic()
            stats = await asyncio.wait_for(task, 30)
            seconds = time.monotonic() - t0
            await delete_session(c, s)
            return stats, seconds

    stats, seconds = run(main(), 60)
    info, camera, mic = opened["video"], opened["camera"], opened["mic"]
    assert (info.width, info.height, info.fps, info.sample_rate) == (128, 64, 25, 48000)
    assert camera.closed and mic.closed
    times = [t for t, _ in camera.sends]
    fps = (len(times) - 1) / (times[-1] - times[0])
    assert 22 <= fps <= 27, f"{fps:.1f} fps into the camera"
    assert all(len(w) == SPF for w in mic.writes) and len(mic.writes) == stats.sent
    assert max(np.abs(w.astype(np.int32)).max() for w in mic.writes) > 1000, "no speech reached the microphone"
    print(f"camera: {stats}, {fps:.2f} fps over {seconds:.1f} s")


@pytest.mark.fixtures
def test_camera_command_without_a_device_says_how_to_set_one_up(capsys, serve):
    server = serve()

    async def open_one():
        async with http() as c:
            return await create_session(c, server.url)

    s = asyncio.run(open_one())
    argv = ["camera", "--server", server.url, "--session", s["id"], "--token", s["token"], "--no-mic"]
    code = cli.main([*argv, "--backend", "v4l2loopback"])
    err = capsys.readouterr().err
    no_token = cli.main(["camera", "--server", server.url, "--session", s["id"]])
    err_token = capsys.readouterr().err
    # Without --session it would open one: the missing camera is found first, and no session is opened for it
    before = len(server.state.sessions)
    opened = cli.main(["camera", "--server", server.url, "--no-mic", "--backend", "v4l2loopback"])
    captured = capsys.readouterr()
    after = len(server.state.sessions)
    assert code == 2 and "no virtual camera" in err and "modprobe v4l2loopback" in err, err
    assert no_token == 2 and "--token" in err_token, err_token
    assert opened == 2 and "no virtual camera" in captured.err and captured.out == "", captured
    assert after == before, "a session was opened for a camera that is not there"
