"""`bench --idle_motion`: what following a head motion while idle costs, beside fix_face in the same run.

A fix_face session idles on its pre-rendered clip (no model work); a session whose pose follows a motion generates
its idle frames live from silence (streaming/session.py), so the head keeps moving between utterances. This
measures, for each, turn-taking as a voice bot does it (idle, then an utterance pushed in real time in 20 ms
pieces, then idle again; a reader plays frames at fps): frames generated per idle second (the device's idle
work), and the time from an utterance's first audio to its first frame on screen (`playback.started`).
Bounded: `rounds` utterances per motion.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..engine import Engine
from ..session import SessionConfig, StreamSession
from .speech import speech

PUSH = 320  # 20 ms at 16 kHz


def _play_for(session: StreamSession, seconds: float, fps: int, clock: dict[str, float]) -> None:
    """Read frames at fps for `seconds` (the clock carries the frame schedule across calls)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        while clock["next"] <= time.monotonic():
            session.read_frame()
            clock["next"] += 1 / fps
        time.sleep(0.003)


def _one_motion(
    engine: Engine, avatar_id: str, cfg: SessionConfig, motion: str, rounds: int, idle_s: float, speech_s: float
) -> dict[str, Any]:
    session = engine.open_session(avatar_id, cfg.with_params(motion=motion))
    started: list[float] = []
    session.add_listener(lambda e: started.append(time.monotonic()) if e.type == "playback.started" else None)
    clock = {"next": time.monotonic()}
    pcm = speech(speech_s)
    idle_frames = 0.0
    idle_seconds = 0.0
    waits: list[float] = []
    try:
        _play_for(session, 1.0, cfg.fps, clock)  # settle: live idle reaches its steady state
        for _ in range(rounds):
            made = engine.worker.frames_generated
            _play_for(session, idle_s, cfg.fps, clock)
            idle_frames += engine.worker.frames_generated - made
            idle_seconds += idle_s
            first_push, count = time.monotonic(), len(started)
            for i in range(0, len(pcm), PUSH):  # in real time, reading frames meanwhile
                session.push_audio(pcm[i : i + PUSH])
                _play_for(session, max(0.0, first_push + (i + PUSH) / 16000 - time.monotonic()), cfg.fps, clock)
            session.end_utterance()
            deadline = time.monotonic() + 30.0
            while (session.pending_utterances or len(started) == count) and time.monotonic() < deadline:
                _play_for(session, 0.05, cfg.fps, clock)
            if len(started) > count:
                waits.append(1000 * (started[count] - first_push))
    finally:
        stats = session.stats()
        session.close()
    a = np.array(waits) if waits else np.full(1, np.nan)
    return {
        "motion": motion,
        "idle_frames_generated_per_s": idle_frames / idle_seconds,
        "speech_start_p50_ms": float(np.percentile(a, 50)),
        "speech_start_max_ms": float(a.max()),
        "utterances": len(waits),
        "underruns": stats["underruns"],
    }


def idle_motion(
    engine: Engine,
    avatar_id: str,
    cfg: SessionConfig,
    motions: tuple[str, ...] = ("fix_face", "nod"),
    rounds: int = 3,
    idle_s: float = 2.0,
    speech_s: float = 1.0,
) -> dict[str, Any]:
    engine.start()
    rows = [_one_motion(engine, avatar_id, cfg, m, rounds, idle_s, speech_s) for m in motions]
    base = rows[0]["speech_start_p50_ms"]
    for row in rows:
        row["speech_start_vs_first"] = row["speech_start_p50_ms"] / base if base else float("nan")
    return {"fps": cfg.fps, "rounds": rounds, "idle_s": idle_s, "rows": rows}


def print_idle_motion(out: dict[str, Any]) -> None:
    print(f"idle motion ({out['rounds']} utterances after {out['idle_s']:g} s idle each, {out['fps']} fps):")
    head = ("motion", "idle frames/s", "speech start p50 ms", "max ms", "ratio", "underruns")
    print("  {:<10} {:>14} {:>20} {:>8} {:>6} {:>9}".format(*head))
    for r in out["rows"]:
        print(
            f"  {r['motion']:<10} {r['idle_frames_generated_per_s']:>14.1f} {r['speech_start_p50_ms']:>20.0f} "
            f"{r['speech_start_max_ms']:>8.0f} {r['speech_start_vs_first']:>6.2f} {r['underruns']:>9}"
        )
