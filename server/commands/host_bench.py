"""`python -m server.commands.host_bench`: the whole server at production settings on this CPU, measured at real peers.

The server (`serve` on the simulated device, 512x512, 25 fps, `--mark_frames`) runs in a child process; N aiortc
publishers (soak's microphone, the avatar's video and audio received) run in this one, both inside a network
namespace that has only loopback (`unshare -n`, made here when run as root). For 1, 2, 4 ... sessions it prints,
per session count:

* delivered fps per session at the peer, and the frame indexes missed (barcode gaps);
* audio-to-screen latency at the peer: the barcoded video frame `k` (k % fps == 0) arrives at the peer; its audio
  (found by its chirp in the received audio) is looked up in the microphone's signal, which tells when the
  microphone captured it; latency = arrival of the picture - capture of the end of its audio;
* A/V offset at the peer: arrival of frame k's chirp minus arrival of frame k's picture (positive: sound late);
* the server process's CPU per session by thread (event loop, encoder pool, model worker, finisher ...), as
  CPU-seconds per delivered frame and cores, from /proc (the process's own CPU, so other jobs on the machine
  matter less than to wall-clock figures); with `--py_spy`, the shares of the server's samples by stage;
* event-loop lag of the server (a 20 ms probe task), and the load average.

    python -m server.commands.host_bench --sessions 1 2 4 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import uvloop
from aiohttp import web

from ..api.state import STATE
from ..media import marks
from ..serving.engine_factory import build_engine
from ..serving.inprocess import InProcessServer
from ..settings.config import ServerConfig
from ..webrtc.peer import restrict_host_addresses
from .soak import MIC_RATE, _mic_track

log = logging.getLogger("server.host_bench")

PROBE_S = 0.02  # the loop-lag probe's period
SEARCH_S = 4.0  # a frame's audio is looked up in the last SEARCH_S of the microphone before the frame arrived
PIECE_S = 0.2  # received audio compared with the microphone's, from frame k's chirp on
MATCH_SCORE = 0.6  # normalised correlation needed to call a piece of received audio the microphone's
LAG_PATH = "/_host_bench/loop"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the microphone's signal: speech-like and different at every point ---------------------------------------------
def speech_like(seconds: float, rate: int = MIC_RATE, seed: int = 7) -> np.ndarray:
    """Voiced syllables with a randomly wandering pitch and pauses: any 30 ms of it is found in one place only (a
    looped clip would match in several). No noise: Opus codes noise by its envelope, not its waveform."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    knots = np.arange(0, seconds + 1, 0.25)
    wander = np.interp(t, knots, rng.uniform(110, 220, len(knots)))
    phase = 2 * np.pi * np.cumsum(wander) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 7))
    syllables = 0.4 + 0.6 * np.abs(np.sin(2 * np.pi * 1.7 * t + rng.uniform(0, 6)))
    talking = (t % 3.0) < 2.4  # 2.4 s of speech, 0.6 s of pause
    return (0.2 * voice * syllables * talking).astype(np.float32)


# -- the server child: `serve` as cli._serve runs it, plus a loop-lag probe and its thread names -------------------
def serve_child(args: argparse.Namespace) -> int:
    config = ServerConfig(
        model_dir="./model_ckpts",  # not read: the simulated device needs no weights
        host="127.0.0.1",
        port=args.port,
        width=args.width,
        height=args.height,
        fps=args.fps,
        max_sessions=max(8, max(args.sessions)),
        ice_host=["127.0.0.1"],
        device=args.device,
        mark_frames=True,
        admission=False,  # the cost model measures this host: every session is let in, the figures say the rest
    ).validate()
    restrict_host_addresses(config.ice_host)
    engine = build_engine(config)
    engine.start()
    lags: list[float] = []

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(PROBE_S)
            lags.append(loop.time() - before - PROBE_S)

    async def loop_figures(request: web.Request) -> web.Response:
        values = np.array(lags or [0.0]) * 1000
        lags.clear()  # each read starts a new window
        threads = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        return web.json_response(
            {
                "lag_ms": {
                    "p50": _r(np.percentile(values, 50)),
                    "p99": _r(np.percentile(values, 99)),
                    "max": _r(values.max()),
                },
                "threads": threads,
                "main": threading.main_thread().native_id,
                "sessions": {s.id: s.stats() for s in engine.sessions()},
                "pumps": {  # frames read, read late, dropped by full queues (the slowest track's)
                    s.id: {"frames": s.pump.frames, "late": s.pump.late_frames, "dropped": s.pump.dropped}
                    for s in request.app[STATE].sessions
                },
            }
        )

    async def main() -> None:
        def add_probe(app: web.Application) -> None:
            app.router.add_get(LAG_PATH, loop_figures)

        server = InProcessServer(config, engine, host="127.0.0.1", port=args.port, add_routes=add_probe)
        await server.start()
        task = asyncio.get_running_loop().create_task(probe())
        try:
            await asyncio.Event().wait()  # until the parent ends this process
        finally:
            task.cancel()
            await server.stop()

    try:
        uvloop.run(main())
    finally:
        engine.close()
    return 0


def _r(x: float, digits: int = 1) -> float:
    return round(float(x), digits)


# -- the server's CPU by thread, from /proc ------------------------------------------------------------------------
def thread_cpu(pid: int) -> dict[int, float]:
    """CPU-seconds (user + system) of each thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def stage_of(name: str | None, main: int, tid: int) -> str:
    """A thread's stage, from its Python name (threads started outside Python: the codecs' and torch's own)."""
    if tid == main:
        return "event loop (aiohttp, aiortc RTP/SRTP, pumps)"
    if name is None:
        return "native threads (libvpx, torch)"
    base = re.sub(r"[-_]?\d+(_\d+)?$", "", name)
    return {
        "ThreadPoolExecutor": "default executor (VP8/Opus encode)",
        "asyncio": "default executor (VP8/Opus encode)",
        "uvloop": "default executor (VP8/Opus encode)",
        "vexpress-model-worker": "model worker (per-call Python, copies)",
    }.get(base, base)


# -- one peer ------------------------------------------------------------------------------------------------------
@dataclass
class Reception:
    video: list[tuple[float, int]] = field(default_factory=list)  # (arrival, barcode index)
    audio: list[tuple[float, int, np.ndarray]] = field(default_factory=list)  # (arrival, pts, channel 0)


class Peer:
    """A WebRTC publisher: soak's microphone playing `speech` in real time; the avatar's video and audio received,
    each video frame's barcode read (from the luma plane: no colour conversion)."""

    def __init__(self, url: str, speech: np.ndarray, params: dict):
        self.url, self.speech, self.params = url, speech, params
        self.rec = Reception()
        self.mic = _mic_track(speech)
        self.session: dict = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self, http) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        async with http.post(f"{self.url}/v1/sessions", json=self.params) as r:
            assert r.status == 201, await r.text()
            self.session = await r.json()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._consume(track))))
        self.pc.addTrack(self.mic)
        self.pc.addTransceiver("video", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(
            self.session["offer_url"],
            json={"sdp": self.pc.localDescription.sdp, "type": "offer"},
            headers=self._auth,
        ) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"offer refused: {r.status} {answer}")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    @property
    def _auth(self) -> dict:
        return {"Authorization": f"Bearer {self.session['token']}"}

    async def _consume(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if track.kind == "video":
                    plane = frame.planes[0]
                    luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: frame.height, : frame.width]
                    self.rec.video.append((now, marks.read_index(luma)))
                else:
                    samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                    self.rec.audio.append((now, frame.pts, samples))
        except MediaStreamError:
            pass
        except Exception:
            log.exception("peer: receiving %s failed", track.kind)
            raise

    async def stop(self, http) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with http.delete(self.session["url"], headers=self._auth):
            pass


def analyse(peer: Peer, start: float, end: float, fps: int) -> dict:
    """The peer's figures for the window [start, end) (monotonic seconds)."""
    video = [(t, k) for t, k in peer.rec.video if start <= t < end]
    indexes = [k for _, k in video]
    missed = sum(max(0, b - a - 1) for a, b in zip(indexes, indexes[1:]) if b > a)
    latencies, offsets = [], []
    if peer.rec.audio and video:
        pts0 = peer.rec.audio[0][1]
        signal = np.zeros(max(p - pts0 + len(s) for _, p, s in peer.rec.audio), np.float32)
        starts = np.array([p - pts0 for _, p, _ in peer.rec.audio])
        for _, p, s in peer.rec.audio:
            signal[p - pts0 : p - pts0 + len(s)] = s
        marked = {k: t for t, k in video if k % fps == 0}
        mic = peer.speech.astype(np.float64)
        frame_samples = MIC_RATE // fps
        skip = int((marks.CHIRP_S + 0.001) * MIC_RATE)
        for chirp_at in marks.find_chirps(signal, MIC_RATE):
            heard = peer.rec.audio[int(np.searchsorted(starts, chirp_at, side="right")) - 1][0]
            k, seen = min(marked.items(), key=lambda kv: abs(kv[1] - heard), default=(None, None))
            if k is None or seen is None or abs(seen - heard) > 0.5:
                continue
            offsets.append(heard - seen)
            piece = signal[chirp_at + skip : chirp_at + skip + int(PIECE_S * MIC_RATE)].astype(np.float64)
            captured = _captured_at(piece, mic, peer.mic.start, seen + PIECE_S)
            if captured is not None:  # when the end of frame k's audio was captured
                latencies.append(seen - (captured - (len(piece) - (frame_samples - skip)) / MIC_RATE))
    seconds = max(1e-9, end - start)
    heard = sum(len(s) for t, _, s in peer.rec.audio if start <= t < end) / MIC_RATE
    return {
        "fps": len(video) / seconds,
        "audio_s_per_s": heard / seconds,  # below 1: speech lost on the way
        "missed": missed,
        "latency_ms": [1000 * x for x in latencies],
        "av_offset_ms": [1000 * x for x in offsets],
    }


def _captured_at(piece: np.ndarray, mic: np.ndarray, mic_start: float | None, seen: float) -> float | None:
    """When the microphone captured the end of `piece` (monotonic seconds), looked up in the SEARCH_S before the
    frame was seen; None for silence or no clear match."""
    if mic_start is None or len(piece) == 0 or np.sqrt(np.mean(piece**2)) < 300:
        return None
    hi = min(len(mic), int((seen - mic_start) * MIC_RATE))
    lo = max(0, hi - int(SEARCH_S * MIC_RATE))
    region = mic[lo:hi] * 32767
    n = len(piece)
    if len(region) < n:
        return None
    size = 1 << int(np.ceil(np.log2(len(region) + n)))
    corr = np.fft.irfft(np.fft.rfft(region, size) * np.conj(np.fft.rfft(piece, size)), size)[: len(region) - n + 1]
    energy = np.sqrt(np.maximum(np.convolve(region * region, np.ones(n), mode="valid"), 1e-9))
    scores = corr / (energy * np.linalg.norm(piece))
    best = int(np.argmax(scores))
    if scores[best] < MATCH_SCORE:
        return None
    return mic_start + (lo + best + n) / MIC_RATE


# -- one case: N sessions ------------------------------------------------------------------------------------------
def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def run_case(
    url: str, pid: int, sessions: int, warmup_s: float, seconds: float, params: dict, py_spy: str | None
) -> dict:
    fps = params["fps"]
    import aiohttp

    speech = speech_like(warmup_s + seconds + 20)
    peers = [Peer(url, speech, params) for _ in range(sessions)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await asyncio.gather(*(p.start(http) for p in peers))
        deadline = time.monotonic() + 30
        while not all(p.rec.video for p in peers):
            assert time.monotonic() < deadline, "no video at some peer within 30 s"
            await asyncio.sleep(0.1)
        await asyncio.sleep(warmup_s)
        await asyncio.to_thread(_get_json, url + LAG_PATH)  # starts the lag window
        cpu0, own0, load0 = thread_cpu(pid), time.process_time(), os.getloadavg()
        spy = _start_py_spy(pid, seconds, py_spy, sessions)
        start = time.monotonic()
        await asyncio.sleep(seconds)
        end = time.monotonic()
        cpu1, own1, load1 = thread_cpu(pid), time.process_time(), os.getloadavg()
        loop = await asyncio.to_thread(_get_json, url + LAG_PATH)
        server_stats = [loop["sessions"].get(p.session["id"], {}) for p in peers]
        await asyncio.sleep(1.0)  # the frames of the window's last second reach the peers
        await asyncio.gather(*(p.stop(http) for p in peers))
    shares = _finish_py_spy(spy)
    figures = [analyse(p, start, end, fps) for p in peers]
    wall = end - start
    frames = sum(f["fps"] for f in figures) * wall
    names = {int(k): v for k, v in loop["threads"].items()}
    by_stage: dict[str, float] = {}
    for tid, cpu in cpu1.items():
        stage = stage_of(names.get(tid), loop["main"], tid)
        by_stage[stage] = by_stage.get(stage, 0.0) + cpu - cpu0.get(tid, 0.0)
    total = sum(by_stage.values())
    lat = [x for f in figures for x in f["latency_ms"]]
    off = [x for f in figures for x in f["av_offset_ms"]]
    return {
        "sessions": sessions,
        "seconds": round(wall, 1),
        "fps_per_session": [_r(f["fps"]) for f in figures],
        "missed_indexes": [f["missed"] for f in figures],
        "audio_s_per_s": [_r(f["audio_s_per_s"], 2) for f in figures],
        "latency_ms": _pcts(lat),
        "av_offset_ms": _pcts(off),
        "server_cpu": {
            "cores": _r(total / wall, 2),
            "ms_per_frame": _r(1000 * total / max(1, frames)),
            "cores_per_session": _r(total / wall / sessions, 2),
            "by_stage_ms_per_frame": {
                k: _r(1000 * v / max(1, frames)) for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1])
            },
        },
        "peers_cpu_cores": _r((own1 - own0) / wall, 2),
        "loop_lag_ms": loop["lag_ms"],
        "engine": {
            "latency_p95_ms": [_r(s.get("latency_p95_ms", 0)) for s in server_stats],
            "skipped_speech_pictures": [s.get("skipped_speech_pictures") for s in server_stats],
            "underruns": [s.get("underruns") for s in server_stats],
            "live_dropped_ms": [s.get("live_dropped_ms") for s in server_stats],
            "pump": [loop["pumps"].get(p.session["id"]) for p in peers],
        },
        "load_avg": [_r(load0[0], 2), _r(load1[0], 2)],
        "py_spy_shares": shares,
    }


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.array(values)
    return {"n": len(a), "p50": _r(np.percentile(a, 50)), "p95": _r(np.percentile(a, 95))}


# -- one case with Chromium on the page ------------------------------------------------------------------------------
CHROMIUM = os.environ.get("VEXPRESS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [  # /work/shared/docs/TESTING.md: headless, fake microphone, 127.0.0.1 candidates, no mDNS
    "--headless=new", "--no-sandbox", "--disable-gpu",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


def chromium_case(url: str, pid: int, warmup_s: float, seconds: float, speech: np.ndarray) -> dict:
    """The browser page (`/`) in headless Chromium, its fake microphone playing `speech`: received fps, audio
    concealed by its jitter buffer, A/V offset from the page's own stats (playout timestamps), and the server's CPU.
    (Audio-to-screen latency is measured at the aiortc peers, which read the barcodes.)"""
    from playwright.sync_api import sync_playwright

    wav = Path(f"/tmp/host_bench_{os.getpid()}.wav")
    write_wav(wav, speech)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"],
                timeout=30_000,
            )
            try:
                page = browser.new_page()
                page.goto(f"{url}/?loopback=1", wait_until="load", timeout=15_000)
                page.wait_for_function("window.vexpress !== undefined", timeout=5_000)
                page.click("#start")
                page.wait_for_function(
                    "window.vexpress.lastError || window.vexpress.pc?.connectionState === 'connected'", timeout=30_000
                )
                error = page.evaluate("window.vexpress.lastError")
                if error:
                    raise RuntimeError(f"the page failed: {error}")
                page.wait_for_function("(async () => (await window.vexpress.stats()).video?.framesDecoded > 0)()")
                page.wait_for_timeout(int(warmup_s * 1000))
                _get_json(url + LAG_PATH)
                s0, cpu0, load0 = page.evaluate("window.vexpress.stats()"), thread_cpu(pid), os.getloadavg()
                offsets = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    page.wait_for_timeout(1000)
                    st = page.evaluate("window.vexpress.stats()")
                    v, a = st.get("video") or {}, st.get("audio") or {}
                    if v.get("estimatedPlayoutTimestamp") and a.get("estimatedPlayoutTimestamp"):
                        offsets.append(v["estimatedPlayoutTimestamp"] - a["estimatedPlayoutTimestamp"])
                s1, cpu1, load1 = page.evaluate("window.vexpress.stats()"), thread_cpu(pid), os.getloadavg()
                loop = _get_json(url + LAG_PATH)
                page.click("#stop")
            finally:
                browser.close()
    finally:
        wav.unlink(missing_ok=True)
    wall = (s1["time"] - s0["time"]) / 1000
    frames = s1["video"]["framesDecoded"] - s0["video"]["framesDecoded"]
    samples = s1["audio"]["totalSamplesReceived"] - s0["audio"]["totalSamplesReceived"]
    concealed = s1["audio"]["concealedSamples"] - s0["audio"]["concealedSamples"]
    total = sum(cpu1.values()) - sum(cpu0.get(t, 0.0) for t in cpu1)
    return {
        "sessions": "1 (Chromium)",
        "seconds": _r(wall),
        "codec": s1["video"].get("codec"),
        "frame_size": [s1["video"].get("frameWidth"), s1["video"].get("frameHeight")],
        "fps_per_session": [_r(frames / wall)],
        "audio_concealed_pct": _r(100 * concealed / max(1, samples)),
        "av_offset_ms": _pcts([-x for x in offsets]),  # positive: sound later than picture
        "latency_ms": {"n": 0},
        "server_cpu": {"cores": _r(total / wall, 2), "ms_per_frame": _r(1000 * total / max(1, frames))},
        "loop_lag_ms": loop["lag_ms"],
        "load_avg": [_r(load0[0], 2), _r(load1[0], 2)],
    }


def write_wav(path: Path, samples: np.ndarray, rate: int = MIC_RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


# -- py-spy: shares of the server's samples by stage ----------------------------------------------------------------
STAGES = [  # (stage, a frame in the stack that says it), most specific first
    ("VP8/H.264 encode", ("codecs/vpx.py", "codecs/h264.py")),
    ("Opus encode", ("codecs/opus.py",)),
    ("frame marks (diagnostic)", ("server/media/marks.py",)),
    ("media pump, engine read", ("streaming/session.py", "server/media/pump.py")),
    ("finisher (decode stand-in, images)", ("streaming/finisher.py",)),
    ("model worker (per-call Python, copies)", ("streaming/worker.py",)),
    ("RTP/SRTP/DTLS send", ("aiortc/rtp", "aiortc/rtcrtpsender.py", "aiortc/rtcdtlstransport.py")),
    ("RTP receive (mic)", ("aiortc/rtcrtpreceiver.py", "aiortc/jitterbuffer.py")),
    ("ICE/UDP", ("aioice/",)),
]


def _start_py_spy(pid: int, seconds: float, out_dir: str | None, sessions: int):
    if not out_dir:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"server_{sessions}.txt"
    cmd = [
        "py-spy",
        "record",
        "-p",
        str(pid),
        "-d",
        str(int(seconds)),
        "-r",
        "50",
        "-f",
        "raw",
        "--nonblocking",
        "--threads",
    ]
    return path, subprocess.Popen([*cmd, "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _finish_py_spy(spy) -> dict | None:
    if spy is None:
        return None
    path, proc = spy
    proc.wait(60)
    return stage_shares(path.read_text().splitlines())


def stage_shares(lines: list[str]) -> dict[str, float]:
    """Percent of the samples of a py-spy raw (collapsed) profile by stage: a sample counts for the first stage of
    STAGES whose file is in its stack."""
    counts: Counter = Counter()
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        stage = next((s for s, files in STAGES if any(f in stack for f in files)), "other")
        counts[stage] += int(n)
    total = sum(counts.values()) or 1
    return {k: _r(100 * v / total) for k, v in counts.most_common()}


# -- the command ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.commands.host_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4], help="session counts (default 1 2 4)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per case (default 20)")
    p.add_argument("--warmup_s", type=float, default=5.0, help="seconds after the first frames, before measuring")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--device", default="sim:h100")
    p.add_argument("--steps", type=int, default=2, help="the sessions' steps (default 2: docs/streaming.md's choice)")
    p.add_argument("--new_frames", type=int, default=4, help="the sessions' new frames per call (default 4)")
    p.add_argument("--chromium", action="store_true", help="also one session with Chromium on the page")
    p.add_argument("--py_spy", default=None, help="profile the server with py-spy; raw profiles into this folder")
    p.add_argument("--json", dest="json_path", default=None, help="also write the figures to this file")
    p.add_argument("--no_netns", action="store_true", help="do not make a loopback-only network namespace")
    p.add_argument("--port", type=int, default=8931, help="the server's port (0: a free one)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server child
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_child(args)
    if not args.no_netns:  # again, inside a namespace with only loopback
        inner = shlex.join([sys.executable, "-m", "server.commands.host_bench", *(argv or sys.argv[1:]), "--no_netns"])
        return subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {inner}"])
    restrict_host_addresses(["127.0.0.1"])  # the peers' candidates too
    if args.port == 0:
        args.port = free_port()
    child = [
        sys.executable,
        "-m",
        "server.commands.host_bench",
        *(argv or sys.argv[1:]),
        "--serve",
        f"--port={args.port}",
    ]
    server = subprocess.Popen(child, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        _wait_ready(url, server)
        cases = []
        for n in args.sessions:
            params = {"fps": args.fps, "steps": args.steps, "new_frames": args.new_frames}
            case = asyncio.run(run_case(url, server.pid, n, args.warmup_s, args.seconds, params, args.py_spy))
            cases.append(case)
            print(json.dumps(case), flush=True)
        if args.chromium:
            case = chromium_case(url, server.pid, args.warmup_s, args.seconds, speech_like(args.seconds + 60))
            cases.append(case)
            print(json.dumps(case), flush=True)
        report = {
            "command": "python -m server.commands.host_bench " + shlex.join(argv or sys.argv[1:]),
            "cpus": os.cpu_count(),
            "cases": cases,
        }
        print(table(cases))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(30)
    return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode})")
        try:
            if _get_json(url + "/readyz").get("status") == "ready":
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server was not ready in time")


def table(cases: list[dict]) -> str:
    """The cases as a Markdown table; server CPU in ms per delivered frame (all sessions' frames), by stage."""
    rows = [
        "| sessions | fps per session | audio s/s | latency p50/p95 ms | A/V offset p50 ms | server CPU ms/frame "
        "(cores) | by stage: loop / encode pool / worker / finisher / rest | loop lag p99/max ms | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        cpu = c["server_cpu"]
        stages = cpu.get("by_stage_ms_per_frame", {})
        picked = [_stage(stages, key) for key in ("event loop", "default executor", "model worker", "finisher")]
        rest = _r(sum(stages.values()) - sum(picked)) if stages else None
        audio = c.get("audio_s_per_s") or f"{c.get('audio_concealed_pct')} % concealed"
        rows.append(
            f"| {c['sessions']} | {', '.join(str(x) for x in c['fps_per_session'])} "
            f"| {', '.join(str(x) for x in audio) if isinstance(audio, list) else audio} "
            f"| {c['latency_ms'].get('p50')} / {c['latency_ms'].get('p95')} | {c['av_offset_ms'].get('p50')} "
            f"| {cpu['ms_per_frame']} ({cpu['cores']}) "
            f"| {' / '.join(str(x) for x in picked) + f' / {rest}' if stages else '-'} "
            f"| {c['loop_lag_ms']['p99']} / {c['loop_lag_ms']['max']} | {c['load_avg'][0]}-{c['load_avg'][1]} |"
        )
    return "\n".join(rows)


def _stage(stages: dict[str, float], prefix: str) -> float:
    return _r(sum(v for k, v in stages.items() if prefix in k))


if __name__ == "__main__":
    sys.exit(main())
