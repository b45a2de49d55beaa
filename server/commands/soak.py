"""`vexpress-rt soak`: N sessions for M minutes against the real server on 127.0.0.1, then one JSON report of what
creeps up over hours: latency p95 in the first and last minute, resident memory, open file descriptors, threads
and event-loop tasks at start and end, sessions served.

The server (HTTP API, WebRTC, websockets, the engine) runs in a thread of this process, exactly as `serve` runs it;
the clients are real: a WebRTC publisher (a microphone playing speech in real time, the avatar's video and audio
received) or a voice bot (PCM16 utterances pushed in real time on the websocket, the frames websocket consumed).
Each client opens a session, keeps it `--session_s`, ends it and opens the next until the time is up, so sessions
are created and released all along (where leaks live).

    vexpress-rt soak --model_dir ./model_ckpts --sessions 4 --minutes 10
    vexpress-rt soak --model_dir ../shared/fixtures/vexpress-tiny/model_ckpts --device cpu --width 128 --height 64 \\
        --fps 10 --steps 2 --sessions 2 --minutes 2

Latency is the engine's: from the moment the audio of a frame was pushed to the moment the frame was ready.
The clients start once `/readyz` says `ready` (the default portrait registered and the engine warm; bounded by
`--ready_timeout_s`), so that the run measures a server in service, not its start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np

from .. import metrics
from ..serving.inprocess import ServerThread

log = logging.getLogger("server.soak")

MIC_RATE = 48000
BOT_RATE = 16000
READY_TIMEOUT_S = 900.0  # the default portrait is encoded at start-up: minutes on a small CPU at 512x512
READY_POLL_S = 0.25


def add_soak_command(sub) -> None:
    p = sub.add_parser(
        "soak",
        help="N sessions for M minutes on 127.0.0.1 (real HTTP/WebRTC/websocket clients); JSON report of latency, "
        "memory, fds, threads and tasks at start and end",
    )
    p.add_argument("--model_dir", default="./model_ckpts", help="model folder in the released layout")
    p.add_argument("--sessions", type=int, default=2, help="clients at once (default 2)")
    p.add_argument("--minutes", type=float, default=2.0, help="length of the run (default 2)")
    p.add_argument(
        "--session_s",
        type=float,
        default=60.0,
        help="each client ends its session and opens a new one "
        "after this many seconds (default 60; 0: one session for the whole run)",
    )
    p.add_argument(
        "--client",
        choices=["webrtc", "ws", "mixed"],
        default="mixed",
        help="WebRTC publishers, websocket bots, or both alternately (default)",
    )
    p.add_argument("--audio", default=None, help="speech to loop (any audio file); default: a synthetic voice")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--steps", type=int, default=None, help="default: the server's (its preset's)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--admission", action="store_true", help="keep admission control on (refusals are counted)")
    p.add_argument(
        "--ready_timeout_s",
        type=float,
        default=READY_TIMEOUT_S,
        help=f"wait this long at most for /readyz to say ready before the clients start (default {READY_TIMEOUT_S:g})",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write the report to this file")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    from ..serving.engine_factory import build_engine
    from ..settings.config import ServerConfig

    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    config = ServerConfig(
        model_dir=args.model_dir,
        host="127.0.0.1",
        port=0,
        width=args.width,
        height=args.height,
        fps=args.fps,
        steps=args.steps,
        max_sessions=max(4, args.sessions),
        ice_host=["127.0.0.1"],
        device=args.device,
        dtype=args.dtype,
        admission=args.admission,
    ).validate()
    engine = build_engine(config)
    engine.start()
    try:
        report = run_soak(
            engine,
            config,
            args.sessions,
            args.minutes * 60,
            args.session_s,
            args.client,
            load_speech(args.audio),
            ready_timeout_s=args.ready_timeout_s,
        )
    finally:
        engine.close()
    report["command"] = " ".join(["vexpress-rt", "soak", *sys.argv[2:]]) if len(sys.argv) > 1 else "vexpress-rt soak"
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    return 0


def load_speech(path: str | None) -> np.ndarray:
    """Mono float32 at 48 kHz: the given file, else a voiced signal with a syllable rhythm and pauses."""
    if path:
        from vexpress_rt.media import load_audio, resample_pcm

        audio = load_audio(path)
        return resample_pcm(audio.samples, audio.sample_rate, MIC_RATE).mean(axis=0).astype(np.float32)
    t = np.arange(6 * MIC_RATE) / MIC_RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.5 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / MIC_RATE) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5
    talking = (t % 3.0) < 2.2  # 2.2 s of speech, 0.8 s of pause
    return (0.25 * voice * syllables * talking).astype(np.float32)


# -- the server, in a thread of its own ------------------------------------------------------------------------------
class _Server(ServerThread):
    """The served app on a thread of its own (server/serving/inprocess.py), and what the soak reads of it."""

    def __init__(self, config, engine):
        super().__init__(config, engine, name="soak-server")

    def start(self) -> str:  # type: ignore[override]
        super().start(wait_ready=False)  # wait_ready() below measures the wait, over HTTP as a client sees it
        return self.url

    def wait_ready(self, timeout_s: float) -> float:
        """Poll `/readyz` until it says `ready`; the seconds it took. RuntimeError when it says `failed` or does
        not say `ready` within `timeout_s`."""
        start = time.monotonic()
        status = "no answer"
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as r:
                    status = json.loads(r.read()).get("status", "?")
            except urllib.error.HTTPError as exc:  # 503 while starting, warming (or failed)
                body = json.loads(exc.read() or b"{}")
                status = body.get("status", f"HTTP {exc.code}")
                if status == "failed":
                    raise RuntimeError(f"the server could not start: {body.get('error')}") from exc
            except (urllib.error.URLError, OSError, ValueError) as exc:
                status = f"no answer ({exc})"
            waited = time.monotonic() - start
            if status == "ready":
                return waited
            if waited > timeout_s:
                raise RuntimeError(f"/readyz did not say ready within {timeout_s:g} s (last: {status})")
            time.sleep(READY_POLL_S)

    def figures(self) -> dict:
        async def snap():
            return metrics.snapshot()

        figures = self.call(snap())
        figures["sessions_open"] = len(self.state.sessions)
        figures["engine_sessions"] = len(self.state.engine.sessions())
        return figures


# -- clients ---------------------------------------------------------------------------------------------------------
def _mic_track(speech: np.ndarray):
    import av
    from aiortc.mediastreams import MediaStreamTrack

    pcm = (np.clip(speech, -1, 1) * 32767).astype(np.int16)

    class Microphone(MediaStreamTrack):
        """What a browser sends: 20 ms of 48 kHz stereo s16, in real time, the speech looping."""

        kind = "audio"

        def __init__(self):
            super().__init__()
            self.sent, self.start = 0, None

        async def recv(self):
            n = MIC_RATE // 50
            self.start = self.start or time.monotonic()
            await asyncio.sleep(max(0.0, self.start + self.sent / MIC_RATE - time.monotonic()))
            at = self.sent % len(pcm)
            chunk = np.resize(pcm[at : at + n], n)
            frame = av.AudioFrame.from_ndarray(np.repeat(chunk, 2)[None, :], format="s16", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = MIC_RATE, self.sent, Fraction(1, MIC_RATE)
            self.sent += n
            return frame

    return Microphone()


class _Clients:
    def __init__(self, url: str, speech: np.ndarray, session_body: dict):
        from vexpress_rt.media import resample_pcm

        self.url, self.speech, self.body = url, speech, session_body
        bot = resample_pcm(speech[None], MIC_RATE, BOT_RATE)[0]
        self.bot_pcm = (np.clip(bot, -1, 1) * 32767).astype("<i2")
        self.counts: Counter = Counter()
        self.frames = 0

    async def run(self, index: int, kind: str, deadline: float, session_s: float) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            while (left := deadline - time.monotonic()) > 1.0:
                length = min(left, session_s) if session_s > 0 else left
                try:
                    async with http.post(f"{self.url}/v1/sessions", json=self.body) as r:
                        if r.status != 201:
                            self.counts[f"refused_{r.status}"] += 1
                            await asyncio.sleep(min(5.0, left))
                            continue
                        session = await r.json()
                    self.counts["sessions"] += 1
                    await (self._webrtc if kind == "webrtc" else self._bot)(http, session, length)
                except Exception as exc:  # counted and reported; the soak goes on
                    self.counts[f"error_{type(exc).__name__}"] += 1
                    log.warning("client %d: %s: %s", index, type(exc).__name__, exc)
                    await asyncio.sleep(1.0)

    async def _webrtc(self, http, session: dict, seconds: float) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import MediaStreamError

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tasks = []

        async def consume(track):
            try:
                while True:
                    await track.recv()
                    if track.kind == "video":
                        self.frames += 1
            except MediaStreamError:
                pass

        pc.on("track", lambda track: tasks.append(asyncio.ensure_future(consume(track))))
        pc.addTrack(_mic_track(self.speech))
        pc.addTransceiver("video", direction="recvonly")
        try:
            await pc.setLocalDescription(await pc.createOffer())
            headers = {"Authorization": f"Bearer {session['token']}"}
            async with http.post(
                session["offer_url"], json={"sdp": pc.localDescription.sdp, "type": "offer"}, headers=headers
            ) as r:
                answer = await r.json()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            await asyncio.sleep(seconds)
        finally:
            await pc.close()  # the publisher leaves: the server ends its session
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _bot(self, http, session: dict, seconds: float) -> None:
        import aiohttp

        query = f"?token={session['token']}"
        base = session["ws_url"].rsplit("/", 1)[0]
        bot = await http.ws_connect(f"{base}/ws{query}")
        viewer = await http.ws_connect(f"{base}/frames{query}")

        async def watch():
            async for msg in viewer:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self.frames += 1

        async def drain():  # the bot reads its events, as it must
            async for _ in bot:
                pass

        readers = [asyncio.ensure_future(watch()), asyncio.ensure_future(drain())]
        try:
            start, chunk, pos, spoken = time.monotonic(), BOT_RATE // 50, 0, 0
            while (now := time.monotonic()) - start < seconds:
                await bot.send_bytes(self.bot_pcm[pos : pos + chunk].tobytes())
                pos = (pos + chunk) % (len(self.bot_pcm) - chunk)
                spoken += 1
                if spoken % 200 == 0:  # an utterance every 4 s
                    await bot.send_str('{"type": "audio.end"}')
                await asyncio.sleep(max(0.0, start + spoken * 0.02 - now))
        finally:
            await bot.close()
            await viewer.close()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            async with http.delete(session["url"], headers={"Authorization": f"Bearer {session['token']}"}):
                pass


class _LatencySampler:
    """Collects every frame's latency with the time it was recorded (the engine keeps only the last 2000)."""

    def __init__(self, engine):
        self.engine = engine
        self.samples: list[tuple[float, float]] = []
        self._seen: dict[str, int] = {}

    def poll(self, now: float) -> None:
        for session in self.engine.sessions():
            count = session.latency_count
            new = min(count - self._seen.get(session.id, 0), len(session.latencies_ms))
            self._seen[session.id] = count
            if new > 0:
                try:
                    values = list(session.latencies_ms)[-new:]
                except RuntimeError:  # appended to while copied: next time
                    continue
                self.samples += [(now, v) for v in values]
        live = {s.id for s in self.engine.sessions()}
        for sid in list(self._seen):
            if sid not in live:
                del self._seen[sid]

    def series(self, elapsed: float, step: float) -> list[dict]:
        out, t = [], 0.0
        while t < elapsed:
            p95, n = self.p95(t, t + step)
            out.append({"t_s": round(t, 1), "p95": p95, "n": n})
            t += step
        return out

    def p95(self, start: float, end: float) -> tuple[float | None, int]:
        values = [v for t, v in self.samples if start <= t < end]
        return (round(float(np.percentile(values, 95)), 1) if values else None), len(values)


def run_soak(
    engine,
    config,
    sessions: int,
    seconds: float,
    session_s: float,
    client: str,
    speech: np.ndarray,
    timeline_every_s: float = 10.0,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> dict:
    """The soak against `engine` (started; stays the caller's), from the moment the server is ready. Returns the
    report."""
    server = _Server(config, engine)
    url = server.start()
    try:
        ready_s = server.wait_ready(ready_timeout_s)
        gc.collect()
        start_figures = server.figures()
        errors0, frames0 = engine.worker.errors, engine.worker.frames_generated
        clients = _Clients(url, speech, {"fps": config.fps, "steps": config.steps})
        sampler = _LatencySampler(engine)
        window = min(60.0, seconds / 2)
        timeline: list[dict] = []
        warm: dict = {}

        async def main():
            t0 = time.monotonic()
            deadline = t0 + seconds
            kinds = ["webrtc", "ws"] if client == "mixed" else [client]
            workers = [
                asyncio.ensure_future(clients.run(i, kinds[i % len(kinds)], deadline, session_s))
                for i in range(sessions)
            ]
            next_mark = 0.0
            while not all(w.done() for w in workers):
                await asyncio.sleep(0.5)
                now = time.monotonic() - t0
                sampler.poll(now)
                if not warm and now >= window:
                    warm.update(await asyncio.to_thread(server.figures))
                if now >= next_mark:
                    point = await asyncio.to_thread(server.figures)
                    timeline.append({"t_s": round(now, 1), **point})
                    next_mark += timeline_every_s
            await asyncio.gather(*workers, return_exceptions=True)
            return time.monotonic() - t0

        elapsed = asyncio.run(main())
        deadline = time.monotonic() + 15
        while (len(server.state.sessions) or engine.sessions()) and time.monotonic() < deadline:
            time.sleep(0.2)
        gc.collect()
        time.sleep(1.0)
        end_figures = server.figures()
        first, n_first = sampler.p95(0.0, window)
        last, n_last = sampler.p95(elapsed - window, elapsed + 1)
        return {
            "sessions": sessions,
            "minutes": round(seconds / 60, 2),
            "client": client,
            "size": f"{config.width}x{config.height}",
            "fps": config.fps,
            "steps": engine.config.default_session.params.steps,
            "device": str(engine.models.device),
            "ready_s": round(ready_s, 2),
            "sessions_served": clients.counts["sessions"],
            "client_events": {k: v for k, v in clients.counts.items() if k != "sessions"},
            "frames_received": clients.frames,
            "received_fps_per_session": round(clients.frames / max(1e-9, elapsed) / max(1, sessions), 2),
            "latency_ms": {
                "window_s": round(window, 1),
                "first_p95": first,
                "last_p95": last,
                "first_samples": n_first,
                "last_samples": n_last,
                "last_over_first": round(last / first, 3) if first and last else None,
                "p95_by_window": sampler.series(elapsed, step=max(5.0, min(60.0, seconds / 8))),
            },
            "process": {"start": start_figures, "after_first_window": warm, "end": end_figures},
            "growth_after_first_window": {
                key: round(end_figures[key] - warm[key], 1)
                for key in ("rss_mb", "open_fds", "threads", "tasks")
                if warm.get(key) is not None and end_figures.get(key) is not None
            },
            "engine": {
                "worker_errors": engine.worker.errors - errors0,
                "frames_generated": engine.worker.frames_generated - frames0,
            },
            "timeline": timeline,
        }
    finally:
        server.stop()
