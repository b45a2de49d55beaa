"""`python -m server.commands.pump_lag --model_dir DIR`: how late the event loop runs while one session's media pump
reads presenter frames (docs/framing.md: the astronaut as a 1920x1080 photo, `--framing`/`--background`, default
1280x720 transparent), read on the loop (`--on_loop`, as before) or through the pump's reader thread (as the
server does for composed frames). A 10 ms ticker on the same (uv)loop records each wake-up's lateness; printed as
JSON. Bounded: `--seconds` of measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage.data import astronaut

from streaming.engine import Engine, EngineConfig
from streaming.params import GenerationParams
from streaming.portrait import detect_face_kps
from streaming.session import SessionConfig, StreamSession
from vexpress_rt.loader import load_models
from vexpress_rt.weights import ModelPaths

from ..media.pump import MediaPump

TICK_S = 0.010


async def _measure(session: StreamSession, fps: int, off_loop: bool, seconds: float) -> dict[str, Any]:
    pump = MediaPump(session, fps, read_off_loop=off_loop)
    queue = pump.subscribe(250)
    late: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await asyncio.sleep(TICK_S)
        late.append(1000 * (time.perf_counter() - t0 - TICK_S))
        while len(queue):
            await queue.get()
    await pump.close()
    a = np.array(late)
    return {
        "read": "reader thread" if off_loop else "on the loop",
        "frames": pump.frames,
        "late_frames": pump.late_frames,
        "lag_p50_ms": round(float(np.percentile(a, 50)), 2),
        "lag_p95_ms": round(float(np.percentile(a, 95)), 2),
        "lag_p99_ms": round(float(np.percentile(a, 99)), 2),
        "lag_max_ms": round(float(a.max()), 2),
    }


def _run(coro: Any) -> dict[str, Any]:
    try:
        import uvloop  # as the server runs

        result: dict[str, Any] = uvloop.run(coro)
        return result
    except ImportError:
        return asyncio.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--width", type=int, default=128, help="the model's crop (the tiny model: 128x64)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--framing", default="1280x720")
    parser.add_argument("--background", default="transparent")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--on_loop", action="store_true", help="read frames on the loop (the old way) only")
    parser.add_argument("--off_loop", action="store_true", help="read frames through the reader thread only")
    args = parser.parse_args()
    models = load_models(ModelPaths.from_model_dir(args.model_dir), dtype=torch.float32)
    engine = Engine(models, EngineConfig(width=args.width, height=args.height, admission=False))
    engine.start()
    try:
        photo = Image.fromarray(astronaut()).resize((1920, 1920), Image.Resampling.LANCZOS).crop((0, 200, 1920, 1280))
        avatar = engine.add_avatar(photo, detect_face_kps(photo).kps).id
        config = SessionConfig(framing=args.framing, background=args.background, params=GenerationParams(steps=2))
        modes = [False] if args.on_loop else [True] if args.off_loop else [False, True]
        results = []
        for off_loop in modes:
            session = engine.open_session(avatar, config)
            try:
                results.append(_run(_measure(session, config.fps, off_loop, args.seconds)))
            finally:
                session.close()
        print(json.dumps({"framing": args.framing, "background": args.background, "runs": results}, indent=1))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
