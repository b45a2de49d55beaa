"""Server parts that need no model: settings, ICE, auth, metrics, audio re-chunking, diagnostic marks."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from kit.waits import run

from server import metrics
from server.access.auth import require_api_key, require_session_token, same_secret
from server.access.limits import MessageRate, Verdict
from server.errors import ApiError
from server.media import marks
from server.media.pump import AudioRechunker, AvatarAudioTrack, FrameQueue, MediaPump
from server.settings.config import ConfigError, IceServer, ServerConfig, add_serve_arguments, parse_ice_server
from server.webrtc import peer as rtc
from streaming.frames import AVFrame
from streaming.session_config import SessionConfig


def _parse(argv: list[str], env: dict | None = None) -> ServerConfig:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return ServerConfig.from_args(p.parse_args(argv), env or {})


# -- settings ---------------------------------------------------------------------------------------------------
def test_config_defaults_env_and_flags():
    cfg = _parse([])
    assert (cfg.port, cfg.fps, cfg.steps, cfg.max_sessions, cfg.ice_server, cfg.ice_host) == (8080, 25, None, 4, [], [])
    assert cfg.avatar.endswith("default_portrait.png") and cfg.api_key is None and cfg.admission
    env = {
        "VEXPRESS_PORT": "9000",
        "VEXPRESS_FPS": "30",
        "VEXPRESS_MAX_SESSIONS": "2",
        "VEXPRESS_ICE_HOST": "127.0.0.1, ::1",
        "VEXPRESS_ICE_SERVER": "stun:stun.example.org:3478 turn:al%40ice:p4ss@turn.example.org:3478?transport=tcp",
        "VEXPRESS_API_KEY": "k",
        "VEXPRESS_MARK_FRAMES": "yes",
        "VEXPRESS_ADMISSION": "0",
    }
    cfg = _parse([], env)
    assert (cfg.port, cfg.fps, cfg.max_sessions, cfg.api_key, cfg.mark_frames, cfg.admission) == (
        9000, 30, 2, "k", True, False
    )  # fmt: skip
    assert cfg.ice_host == ["127.0.0.1", "::1"]
    assert cfg.ice_server == [
        IceServer(("stun:stun.example.org:3478",)),
        IceServer(("turn:turn.example.org:3478?transport=tcp",), "al@ice", "p4ss"),
    ]
    # a flag wins over its variable; both spellings of a flag work; repeatable flags accumulate
    cfg = _parse(["--port", "9100", "--max-sessions", "3", "--ice-host", "127.0.0.1", "--ice_host", "::1"], env)
    assert (cfg.port, cfg.max_sessions, cfg.ice_host) == (9100, 3, ["127.0.0.1", "::1"])


def test_serve_preset_and_steps_set_the_sessions_defaults():
    """`serve --preset` (or VEXPRESS_PRESET) picks the sessions' schedule, `--steps` then their steps; without
    either, a session gets the shipped defaults (one declaration: GenerationParams and SessionConfig)."""
    base = SessionConfig(fps=25)
    shipped = _parse([]).session_defaults(base)
    assert (shipped.params.steps, shipped.params.new_frames, shipped.lookahead_s) == (2, 4, 0.0)
    low = _parse([], {"VEXPRESS_PRESET": "low_latency"}).session_defaults(base)
    assert (low.params.steps, low.params.new_frames, low.lookahead_s) == (1, 2, 0.0)
    both = _parse(["--preset", "low_latency", "--steps", "3"]).session_defaults(base)
    assert (both.params.steps, both.params.new_frames) == (3, 2)
    with pytest.raises(ConfigError, match="--preset: preset must be one of default, low_latency, got 'fast'"):
        _parse(["--preset", "fast"])


def test_config_json_ice_server_and_errors():
    s = parse_ice_server('{"urls": ["turn:t.example.org:3478"], "username": "u", "credential": "c"}')
    assert s.to_json() == {"urls": ["turn:t.example.org:3478"], "username": "u", "credential": "c"}
    turn = {"urls": "turn:b.example.org", "username": "u", "credential": "c"}
    env = {"VEXPRESS_ICE_SERVER": json.dumps(["stun:a.example.org", turn])}
    assert [x.urls for x in _parse([], env).ice_server] == [("stun:a.example.org",), ("turn:b.example.org",)]
    for bad in ("http://x", "turn:host.example.org", '{"username": "u"}'):
        with pytest.raises(ConfigError):
            parse_ice_server(bad)
    for argv in (["--ice-host", "localhost"], ["--fps", "0"], ["--width", "100"], ["--dtype", "fp8"]):
        with pytest.raises(ConfigError):
            _parse(argv)
    with pytest.raises(ConfigError):
        _parse([], {"VEXPRESS_PORT": "eighty"})


def test_avatar_kps_sidecar(tmp_path):
    image = tmp_path / "me.png"
    image.write_bytes(b"")
    cfg = ServerConfig(avatar=str(image))
    assert cfg.avatar_kps_path() is None
    (tmp_path / "me.json").write_text('{"kps": [[1, 2], [3, 4], [5, 6]]}')
    assert cfg.avatar_kps_path() == tmp_path / "me.json"
    assert ServerConfig().avatar_kps_path().name == "default_portrait.json"


# -- ICE on loopback ----------------------------------------------------------------------------------------------
def test_ice_host_restriction_connects_two_peers_on_loopback():
    with pytest.raises(ConfigError):
        rtc.restrict_host_addresses(["192.0.2.1"])  # TEST-NET-1: not an address of this machine

    async def main():
        a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        b = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            a.createDataChannel("x")
            await a.setLocalDescription(await a.createOffer())
            await b.setRemoteDescription(a.localDescription)
            await b.setLocalDescription(await b.createAnswer())
            await a.setRemoteDescription(b.localDescription)
            for _ in range(100):  # bounded: 10 s
                if a.connectionState == "connected" and b.connectionState == "connected":
                    break
                await asyncio.sleep(0.1)
            candidates = [
                line for pc in (a, b) for line in pc.localDescription.sdp.splitlines() if "a=candidate" in line
            ]
            return a.connectionState, b.connectionState, candidates
        finally:
            await a.close()
            await b.close()

    rtc.restrict_host_addresses(["127.0.0.1"])
    try:
        state_a, state_b, candidates = run(main(), 20)
    finally:
        rtc.restrict_host_addresses(None)
    assert (state_a, state_b) == ("connected", "connected")
    assert candidates and all(" 127.0.0.1 " in c for c in candidates), candidates


# -- auth ---------------------------------------------------------------------------------------------------------
class _Req:
    def __init__(self, headers=None, query=None, method="GET", path="/v1/sessions/s1/ws"):
        self.headers = headers or {}
        self.query = query or {}
        self.method, self.path = method, path


def test_auth_key_and_token():
    assert same_secret("abc", "abc") and not same_secret("abc", "abd") and not same_secret(None, "x")
    require_api_key(_Req(), None)  # no key configured: open
    require_api_key(_Req({"Authorization": "Bearer k"}), "k")
    require_api_key(_Req({"X-API-Key": "k"}), "k")
    for bad in (_Req(), _Req({"Authorization": "Bearer nope"}), _Req(query={"token": "k"})):
        with pytest.raises(ApiError) as err:
            require_api_key(bad, "k")
        assert err.value.status == 401
    require_session_token(_Req({"Authorization": "Bearer t"}), "t", None)
    require_session_token(_Req(query={"token": "t"}), "t", None)  # a websocket: browsers cannot set headers
    with pytest.raises(ApiError):  # elsewhere a token in the URL is refused
        require_session_token(_Req(query={"token": "t"}, method="POST", path="/v1/sessions/s1/speak"), "t", None)
    require_session_token(_Req({"X-API-Key": "k"}), "t", "k")  # the API key opens every session
    for bad in (_Req(), _Req(query={"token": "other"}), _Req({"Authorization": "Basic t"})):
        with pytest.raises(ApiError):
            require_session_token(bad, "t", "k")


# -- websocket message rate ---------------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _send(rate: MessageRate, clock: _Clock, per_s: float, seconds: float) -> collections.Counter:
    """Messages evenly spaced at `per_s` for `seconds`: the verdicts, stopping at the first CLOSE."""
    verdicts: collections.Counter = collections.Counter()
    for _ in range(round(per_s * seconds)):
        clock.now += 1.0 / per_s
        verdicts[verdict := rate.check()] += 1
        if verdict is Verdict.CLOSE:
            break
    return verdicts


def test_the_default_message_rate_lets_a_fast_bot_through():
    """A bot pushing 20 ms chunks at 5x real time (250 a second) with a mark and a ping every 100 ms, after pushing
    its first 2 s of audio at once, never loses a message under the default --max_ws_messages_per_s."""
    clock = _Clock()
    rate = MessageRate(ServerConfig().max_ws_messages_per_s, clock)
    assert all(rate.check() is Verdict.ACCEPT for _ in range(100))  # 2 s of audio in one go
    assert _send(rate, clock, 250 + 20, 120.0) == {Verdict.ACCEPT: 270 * 120}


def test_the_message_rate_drops_the_excess_and_closes_a_flood():
    clock = _Clock()
    rate = MessageRate(50, clock)  # bursts of 100
    flood = _send(rate, clock, 10_000, 1.0)  # a flood: the burst passes, a burst's worth is dropped, then it ends
    assert 100 <= flood[Verdict.ACCEPT] <= 102 and 100 <= flood[Verdict.DROP] <= 102 and flood[Verdict.CLOSE] == 1
    assert rate.dropped == flood[Verdict.DROP] + 1

    clock = _Clock()
    rate = MessageRate(50, clock)
    slightly_fast = _send(rate, clock, 60, 120.0)  # 1.2x the rate for two minutes: loses the excess only
    assert Verdict.CLOSE not in slightly_fast and 0 < slightly_fast[Verdict.DROP] <= 10 * 120
    assert slightly_fast[Verdict.ACCEPT] >= 50 * 120

    clock = _Clock()
    rate = MessageRate(50, clock)
    twice = _send(rate, clock, 100, 30.0)  # 2x the rate, sustained: closed within seconds
    assert twice[Verdict.CLOSE] == 1 and sum(twice.values()) < 100 * 10
    with pytest.raises(ValueError):
        MessageRate(0)


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_histograms_per_app_registry():
    """Each app has its own registry (several apps in one process); the histograms take each engine record once."""
    first, second = metrics.ServerMetrics(), metrics.ServerMetrics()
    engine_session = SimpleNamespace(id="s1", latencies_ms=collections.deque([100.0, 200.0], maxlen=3), latency_count=2)
    first.observe_latencies(engine_session)
    engine_session.latencies_ms.extend([300.0, 400.0])  # the deque keeps 3: 200, 300, 400
    engine_session.latency_count = 4
    first.observe_latencies(engine_session)
    first.observe_latencies(engine_session)  # nothing new
    first.observe_compute([(0.0, 0.02), (1.0, 1.5)])
    first.observe_compute([(0.0, 0.02), (1.0, 1.5), (2.0, 2.1)])
    first.observe_turns([(0.0, 0.05), (1.0, 1.2)])
    first.observe_turns([(0.0, 0.05), (1.0, 1.2)])  # nothing new
    first.queue_depth.observe(3)
    first.websockets_refused.labels(kind="bot").inc()
    text = first.render().decode()
    assert "vexpress_audio_to_frame_seconds_count 4.0" in text
    assert "vexpress_audio_to_frame_seconds_sum 1.0" in text
    assert "vexpress_engine_compute_seconds_count 3.0" in text
    assert "vexpress_engine_turn_seconds_count 2.0" in text and "vexpress_engine_turn_seconds_sum 0.2499" in text
    assert 'vexpress_track_queue_depth_frames_bucket{le="4.0"} 1.0' in text
    assert 'vexpress_websockets_refused_total{kind="bot"} 1.0' in text
    assert "vexpress_audio_to_frame_seconds_count 0.0" in second.render().decode()


def test_process_figures_from_the_process_collector():
    figures = metrics.process_figures()
    assert figures["process_resident_memory_bytes"] > 0 and figures["process_open_fds"] > 0


# -- media --------------------------------------------------------------------------------------------------------
def _frames(n: int, spf: int = 1920, rate: int = 48000, start: int = 0) -> list[AVFrame]:
    out = []
    for i in range(start, start + n):
        audio = (np.arange(i * spf, (i + 1) * spf) % 30000).astype(np.int16)  # sample value = position mod 30000
        out.append(AVFrame(i, Fraction(1, rate // spf), np.zeros((8, 16, 3), np.uint8), audio, rate, False))
    return out


@pytest.mark.parametrize("spf", [1920, 1600, 960, 1200])  # 25, 30, 50, 40 fps at 48 kHz
def test_rechunker_keeps_positions(spf):
    r = AudioRechunker()
    packets = [p for f in _frames(12, spf) for p in r.push(f)]
    assert all(len(p.samples) == 960 and p.sample_rate == 48000 for p in packets)
    assert [p.position for p in packets] == [960 * k for k in range(len(packets))]
    assert len(packets) == 12 * spf // 960
    for p in packets:  # the content is the stream's samples at those positions
        np.testing.assert_array_equal(p.samples, (np.arange(p.position, p.position + 960) % 30000).astype(np.int16))


def test_rechunker_restarts_after_a_missing_frame():
    r = AudioRechunker()
    frames = _frames(6, 1600)
    packets = [p for f in frames[:2] + frames[4:] for p in r.push(f)]  # frames 2, 3 dropped
    positions = [p.position for p in packets]
    assert positions[:3] == [0, 960, 1920] and positions[3] == 4 * 1600  # no audio moved in time
    for p in packets:
        np.testing.assert_array_equal(p.samples, (np.arange(p.position, p.position + 960) % 30000).astype(np.int16))


def test_rechunker_places_a_late_readers_burst_where_its_audio_belongs():
    """After a late reader's skip, a frame carries the skipped frames' audio before its own (a burst): the packets
    keep the stream's positions, continuous with the audio before, nothing moved in time, nothing lost."""
    r = AudioRechunker()
    frames = _frames(6, 1600)
    burst = frames[5]
    burst.audio = np.concatenate([frames[2].audio, frames[3].audio, frames[4].audio, burst.audio])
    burst.skipped_audio_frames = 3  # frames 2-4: pictures skipped, their audio sent with frame 5
    packets = [p for f in frames[:2] + [burst] for p in r.push(f)]
    assert [p.position for p in packets] == [960 * k for k in range(6 * 1600 // 960)]
    for p in packets:
        np.testing.assert_array_equal(p.samples, (np.arange(p.position, p.position + 960) % 30000).astype(np.int16))


def test_frame_queue_drops_oldest_and_counts():
    async def main():
        q = FrameQueue(3)
        for f in _frames(5):
            q.put(f)
        got = [(await q.get()).index for _ in range(3)]
        q.close()
        return got, q.dropped

    assert asyncio.run(main()) == ([2, 3, 4], 2)


def test_the_audio_keeps_the_pumps_pace_after_the_engine_skipped_frames():
    """A late pump makes the engine skip frame periods (the indexes jump ahead by 12 here): the audio track keeps
    sending at the pump's pace; it does not wait 12 more periods for every packet while its queue drops speech."""
    fps, spf = 25, 1920

    class SkippingSession:
        id, index = "s", 0

        def read_frame(self) -> AVFrame:
            self.index += 13 if self.index == 5 else 1  # one late read: 12 frame periods skipped
            audio = np.full(spf, 1000, np.int16)
            return AVFrame(self.index, Fraction(1, fps), np.zeros((8, 8, 3), np.uint8), audio, 48000, True)

    async def main() -> float:
        pump = MediaPump(SkippingSession(), fps)
        track = AvatarAudioTrack(pump)
        sent, start = 0, asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - start < 1.6:
            sent += (await asyncio.wait_for(track.recv(), 2)).samples
        await pump.close()
        return sent / 48000

    assert asyncio.run(main()) >= 1.3  # about 1.6 s of audio in 1.6 s (0.4 s with the old pacing)


class _ThreadNoting:
    """A session whose read_frame notes the thread it runs in (the engine's composes presenter frames there)."""

    id = "s-thread"

    def __init__(self):
        self.frames = _frames(12)
        self.threads: list[int] = []

    def read_frame(self) -> AVFrame:
        self.threads.append(threading.get_ident())
        return self.frames[len(self.threads) - 1]


@pytest.mark.parametrize("off_loop", [False, True])
def test_the_pump_reads_composed_frames_off_the_event_loop(off_loop):
    """`read_off_loop` (sessions with framing or a background: composing takes milliseconds): read_frame runs in
    the pump's reader thread, never on the loop, and the frames still come in order; plain sessions read on it."""
    session = _ThreadNoting()

    async def main():
        pump = MediaPump(session, 100.0, read_off_loop=off_loop)
        queue = pump.subscribe(20)
        got = [(await queue.get()).index for _ in range(8)]
        await pump.close()
        return threading.get_ident(), got, pump.reads_off_loop

    loop_thread, got, reads_off_loop = run(main())
    assert got == list(range(8)) and reads_off_loop is off_loop
    assert len(session.threads) >= 8
    if off_loop:
        assert loop_thread not in session.threads and len(set(session.threads)) == 1
    else:
        assert set(session.threads) == {loop_thread}


def test_marks_survive_and_are_found():
    image = np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    for index in (0, 1, 25, 4097, 65535):
        stamped = marks.stamp_index(image, index)
        noisy = np.clip(stamped + np.random.default_rng(index).normal(0, 20, stamped.shape), 0, 255)
        assert marks.read_index(noisy) == index
    rate = 48000
    frames = [marks.mark_frame(f, 25) for f in _frames(60, 1920, rate)]
    signal = np.concatenate([f.audio for f in frames]).astype(np.float64)
    signal[: 1920 * 60] += np.random.default_rng(1).normal(0, 2000, 1920 * 60)  # speech-level noise
    assert marks.find_chirps(signal, rate) == [0, 25 * 1920, 50 * 1920]
