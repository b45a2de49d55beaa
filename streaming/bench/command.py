"""`vexpress-rt bench`: the engine's figures, printed as a table and (with --json) one JSON object.

(a) FLOPs per output frame of the engine's settings vs the original inference.py defaults, counted on the meta
    device with the real-size architecture (streaming/flops.py).
(b) With a model on this machine (tiny random weights in memory unless --model_dir): real-time factor (as fast as
    possible), audio-in -> frame-out latency p50/p95 while audio arrives in real time, the engine's overhead
    (latency minus model compute minus waiting for the chunk's audio), and latency p95 of the first and last
    "minute" of a bounded run (quick mode: shorter minutes).
(c) --gpu, instead of (b): the whole engine on a device (streaming/gpu_bench.py): real-size random weights (or
    --model_dir) in fp16/bf16 at 512x512, the default portrait registered, then 1, 2, 4, 8 concurrent sessions fed
    speech in real time: delivered fps, latency, underruns, busy fraction, device ms per frame by stage, peak
    memory; plus the UNet window / decode timings alone. Skipped cleanly without CUDA; `--device cpu` runs it at
    tiny size.
--strategies adds the chunked vs staggered comparison (boundary smoothness, agreement with the offline
pipeline at equal steps, latency). --decoders only times the two live decoders at real size (random weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..avatar import AvatarInfo
from ..engine import Engine
from ..session import SessionConfig
from .flops import engine_flops_per_frame, original_flops_per_frame
from .gpu_bench import percentile
from .speech import speech


def add_bench_command(sub: Any) -> None:  # argparse's sub-parsers action (a private type)
    p = sub.add_parser("bench", help="print the engine's figures (FLOPs, real-time factor, latency)")
    p.add_argument("--model_dir", default=None, help="model folder (default: tiny random weights in memory)")
    p.add_argument("--quick", action="store_true", help="short run (CI): 5 s 'minutes'")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--minutes", type=float, default=None, help="length of the latency run in minutes")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--strategy", default=None, choices=["chunked", "staggered"])
    p.add_argument("--new_frames", type=int, default=None)
    p.add_argument("--context_frames", type=int, default=None)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--lookahead", type=float, default=None, help="wav2vec2 lookahead in seconds (default 0.2)")
    p.add_argument("--width", type=int, default=None, help="frame width (default 128; 512 with --gpu or --decoders)")
    p.add_argument("--height", type=int, default=None, help="frame height (default 64; 512 with --gpu or --decoders)")
    p.add_argument("--strategies", action="store_true", help="also compare chunked and staggered windows")
    p.add_argument(
        "--loop_lag",
        action="store_true",
        help="also measure an asyncio event loop's lateness while the model worker is saturated",
    )
    p.add_argument(
        "--decoders",
        action="store_true",
        help="only time the full (sd-vae-ft-mse) and tiny (TAESD) decoders at real size, random weights, "
        "on CUDA when there is one (--width/--height default to 512 here)",
    )
    p.add_argument(
        "--blink",
        action="store_true",
        help="only measure blinking on real photographs (dlib's landmarks, `.[test]`): rates 0/10/20/30 per minute "
        "over 60 s at 25 fps, counted blinks, eye aspect ratios, change outside the eyes, ms per frame",
    )
    p.add_argument(
        "--idle_motion",
        action="store_true",
        help="also measure idling with a head motion (live idle frames) beside fix_face (the idle clip): idle "
        "frames generated per second and the wait from an utterance's first audio to its first frame",
    )
    p.add_argument("--blink_sheet", default=None, help="with --blink: also write the open/half/closed picture here")
    p.add_argument("--blink_photos", default=None, help="with --blink: a folder of more face photos to measure")
    g = p.add_argument_group("--gpu: the whole engine on a device, N concurrent real-time sessions")
    g.add_argument("--gpu", action="store_true", help="measure the engine end to end on --device (default CUDA)")
    g.add_argument(
        "--device",
        default="cuda",
        help="cuda (default), cpu (tiny size: a quick check of the path) or sim:h100 (a simulated device: each model "
        "call waits what the profile measured on that GPU; streaming/sim/)",
    )
    g.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    g.add_argument(
        "--model_size",
        default=None,
        choices=["real", "tiny"],
        help="random weights at this size when no --model_dir (default: real on CUDA, tiny on CPU)",
    )
    g.add_argument("--sessions", default="1,2,4,8", help="concurrent session counts to ramp through")
    g.add_argument("--seconds", type=float, default=10.0, help="speech fed to every session per count")
    g.add_argument("--max_batch", type=int, default=4, help="windows of different sessions in one UNet call")
    g.add_argument(
        "--decoder",
        default="tiny",
        choices=["tiny", "full"],
        help="the sessions' decoder (default tiny, the live default; full: sd-vae-ft-mse)",
    )
    g.add_argument("--no_components", action="store_true", help="skip the UNet window / decode timings")
    g.add_argument(
        "--eager",
        action="store_true",
        help="also run the engine with eager UNet calls (first session count) beside the CUDA-graph one",
    )
    g.add_argument(
        "--serial",
        action="store_true",
        help="run the engine with the pipelined worker and, beside it, the serial one (first two session counts)",
    )
    p.add_argument(
        "--pipelined",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode, host copy and delivery on a second thread (streaming/finisher.py); auto: on CUDA only",
    )
    p.set_defaults(func=cmd_bench)


def _session_config(args: argparse.Namespace) -> SessionConfig:
    from ..params import GenerationParams

    names = ("steps", "strategy", "new_frames", "context_frames")
    lookahead = {} if args.lookahead is None else {"lookahead_s": args.lookahead}
    params = GenerationParams.from_dict({k: getattr(args, k) for k in names})
    return SessionConfig(fps=args.fps, params=params, **lookahead)


def flops_figures(cfg: SessionConfig) -> dict[str, Any]:
    s = cfg.denoiser_settings()
    # Frames a window call finishes per frame-pass: chunked N of C+N; staggered every frame passes once per
    # step, i.e. steps passes per frame, which `new_frames = window` expresses.
    new = s.new_frames if s.strategy == "chunked" else s.window_frames
    common: dict[str, Any] = dict(
        fps=cfg.fps,
        steps=s.steps,
        guidance_scale=cfg.params.guidance_scale,
        window_frames=s.window_frames,
        new_frames=new,
    )
    engine = engine_flops_per_frame(**common)
    tiny = engine_flops_per_frame(**common, decoder="tiny")
    original = original_flops_per_frame()
    return {
        "flops_per_frame": engine.total,
        "original_flops_per_frame": original.total,
        "flops_ratio": original.total / engine.total,
        "flops_per_frame_tiny_decoder": tiny.total,
        "flops_ratio_tiny_decoder": original.total / tiny.total,
        "flops_breakdown": {"unet": engine.unet, "decoder": engine.decoder, "audio": engine.audio},
    }


def _pipelined(choice: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[choice]


def _load_engine(
    model_dir: Path | None, width: int, height: int, cfg: SessionConfig, pipelined: bool | None = None
) -> tuple[Engine, AvatarInfo]:
    """The engine on this machine's device in fp32 with the default portrait registered: the model folder's
    weights, or without one the tiny architecture with random weights (the same speed as the tiny test model)."""
    import torch

    from ..engine import Engine, EngineConfig
    from ..portrait import load_default_portrait
    from .random_models import random_models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_dir is None:
        models = random_models("tiny", device=device, dtype=torch.float32)
    else:
        from vexpress_rt.loader import load_models
        from vexpress_rt.weights import ModelPaths

        models = load_models(ModelPaths.from_model_dir(model_dir), device=device, dtype=torch.float32)
    config = EngineConfig(
        width=width, height=height, admission=False, default_session=cfg, idle_seconds=0.64, pipelined=pipelined
    )
    engine = Engine(models, config)
    image, kps = load_default_portrait()
    info = engine.add_avatar(image, kps)
    return engine, info


def realtime_factor(engine: Engine, avatar_id: str, cfg: SessionConfig, seconds: float = 4.0) -> float:
    """Seconds of video made per second of worker time, audio pushed as fast as possible."""
    # nobody reads here: let every frame queue
    session = engine.open_session(avatar_id, replace(cfg, max_ready_s=seconds + 60.0))
    try:
        session.push_audio(speech(seconds))
        session.end_utterance()
        engine.worker.turn()  # warm-up turn (first chunk)
        t0 = time.perf_counter()
        made0 = engine.worker.frames_generated
        while engine.worker.turn():
            pass
        engine.worker.drain()  # pipelined: the last call's frames are still being finished
        elapsed = time.perf_counter() - t0
        made = engine.worker.frames_generated - made0
        return (made / cfg.fps) / elapsed if elapsed > 0 else float("inf")
    finally:
        session.close()


def latency_run(
    engine: Engine, avatar_id: str, cfg: SessionConfig, minute_s: float, minutes: int = 2
) -> dict[str, Any]:
    """Audio arrives in real time in 20 ms pushes while a reader plays frames at fps; bounded in time."""
    engine.start()
    session = engine.open_session(avatar_id, cfg)
    pcm = speech(minute_s * minutes)
    push = 320  # 20 ms at 16 kHz
    start = time.monotonic()
    next_frame = 0
    pushed = 0
    try:
        while pushed < len(pcm):
            now = time.monotonic() - start
            while pushed < len(pcm) and pushed / 16000 <= now:
                session.push_audio(pcm[pushed : pushed + push])
                pushed += push
            while next_frame / cfg.fps <= now:
                session.read_frame()
                next_frame += 1
            time.sleep(0.004)
        session.end_utterance()
        deadline = time.monotonic() + max(30.0, 4 * minute_s * minutes)  # a slow device: let it finish
        while session.buffered_ms > 0 and time.monotonic() < deadline:
            now = time.monotonic() - start
            while next_frame / cfg.fps <= now:
                session.read_frame()
                next_frame += 1
            time.sleep(0.004)
    finally:
        session.close()
        engine.worker.stop()
    chunks = [c for c in engine.worker.chunk_log if c["session"] == session.id and c["frames"]]
    latencies: list[float] = []
    overheads: list[float] = []
    first: list[float] = []
    last: list[float] = []
    for c in chunks:
        for audio_time in c["audio_times"]:
            ms = 1000 * (c["ready"] - audio_time)
            latencies.append(ms)
            (first if audio_time - start < minute_s else last).append(ms)
        if c["trigger"] is not None:  # from the audio that completed the chunk to its frames being ready
            waited = c["ready"] - c["trigger"]
            overheads.append(1000 * (waited - engine.worker.compute_between(c["trigger"], c["ready"])))
    stats = session.stats()

    p = percentile
    return {
        "latency_p50_ms": p(latencies, 50),
        "latency_p95_ms": p(latencies, 95),
        "overhead_p50_ms": p(overheads, 50),
        "overhead_p95_ms": p(overheads, 95),
        "latency_p95_first_minute_ms": p(first, 95),
        "latency_p95_last_minute_ms": p(last, 95),
        "minute_s": minute_s,
        "underruns": stats["underruns"],
        "dropped_frames": stats["dropped_frames"],
    }


def decoder_figures(width: int = 512, height: int = 512, frames: int = 2, repeats: int = 3) -> dict[str, Any]:
    """ms per frame of the full and the tiny decoder, side by side, decoding `frames` latents per call through
    the engine's own decode path (uint8 frames on the host), real-size architectures with random weights."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny
    from diffusers.utils import logging as diffusers_logging

    from vexpress_rt.pipeline import VAE_SCALE

    from ..decoder import FrameDecoder
    from .flops import SD_VAE_CONFIG

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    decoders = {
        "full": FrameDecoder("full", AutoencoderKL(**SD_VAE_CONFIG), VAE_SCALE),
        "tiny": FrameDecoder.tiny(AutoencoderTiny()),
    }
    latents = torch.randn(frames, 4, height // 8, width // 8, device=device, dtype=dtype)
    diffusers_logging.set_verbosity_error()  # its note on casting the VAE with .to() is expected here
    out: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "size": [width, height],
        "frames_per_call": frames,
        "ms_per_frame": {},
    }
    for name, decoder in decoders.items():
        decoder.vae.to(device, dtype).eval().requires_grad_(False)
        if device.type == "cuda":  # kernel selection and allocation; the CPU has nothing to warm up
            decoder(latents)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            decoder(latents)  # ends with the copy to the host: synchronised
        out["ms_per_frame"][name] = 1000 * (time.perf_counter() - t0) / (repeats * frames)
    out["full_over_tiny"] = out["ms_per_frame"]["full"] / out["ms_per_frame"]["tiny"]
    return out


def _print_decoders(out: dict[str, Any]) -> None:
    ms = out["ms_per_frame"]
    print(
        f"decoders on {out['device']} ({out['dtype']}, {out['size'][0]}x{out['size'][1]}, "
        f"{out['frames_per_call']} frames per call, random weights)"
    )
    print(f"  {'full (sd-vae-ft-mse) ms/frame':<32} {ms['full']:>10.1f}")
    print(f"  {'tiny (TAESD) ms/frame':<32} {ms['tiny']:>10.1f}")
    print(f"  {'full / tiny':<32} {out['full_over_tiny']:>10.1f}")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.blink:
        from .eyelid_photos import blink_figures, contact_sheet, print_blink_figures

        rows = blink_figures(seconds=10.0 if args.quick else 60.0, extra=args.blink_photos)
        if args.blink_sheet:
            contact_sheet(args.blink_sheet, extra=args.blink_photos)
        if args.json:
            print(json.dumps({"blink": rows}, default=float))
        else:
            print_blink_figures(rows)
        return 0
    if args.decoders:
        quick = dict(frames=1, repeats=1) if args.quick else {}  # the full decoder takes minutes a frame on a CPU
        figures = decoder_figures(args.width or 512, args.height or 512, **quick)
        if args.json:
            print(json.dumps(figures, default=float))
        else:
            _print_decoders(figures)
        return 0
    cfg = _session_config(args)
    out: dict[str, Any] = {
        "settings": {
            "fps": cfg.fps,
            **{k: getattr(cfg.params, k) for k in ("steps", "strategy", "new_frames", "context_frames")},
            "guidance_scale": cfg.params.guidance_scale,
            "lookahead_s": cfg.lookahead_s,
        }
    }
    if args.gpu:
        cfg.decoder = args.decoder
        return _cmd_engine_bench(args, cfg, out)
    out.update(flops_figures(cfg))
    args.width, args.height = args.width or 128, args.height or 64
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is not None and not model_dir.is_dir():
        print(f"error: no model folder at {model_dir}", file=sys.stderr)
        return 2
    engine, info = _load_engine(model_dir, args.width or 128, args.height or 64, cfg, _pipelined(args.pipelined))
    try:  # a worker thread left running at exit aborts the interpreter
        out["model_dir"] = str(model_dir) if model_dir else "random weights, tiny size"
        out["device"] = str(engine.models.device)
        out["pipelined"] = engine.worker.pipelined
        out["realtime_factor"] = realtime_factor(engine, info.id, cfg, seconds=2.0 if args.quick else 8.0)
        minute_s = 60.0 * args.minutes if args.minutes else (5.0 if args.quick else 60.0)
        out.update(latency_run(engine, info.id, cfg, minute_s))
        if args.strategies:
            from .strategies import compare_strategies

            out["strategies"] = compare_strategies(engine.models, info, engine, cfg)
        if args.idle_motion:
            from .idle_motion import idle_motion

            out["idle_motion"] = idle_motion(engine, info.id, cfg, rounds=2 if args.quick else 5)
        if args.loop_lag:
            from .loop_lag import loop_lag

            out["loop_lag"] = loop_lag(engine, info.id, cfg, seconds=3.0 if args.quick else 10.0)
    finally:
        engine.close()
    if args.json:
        print(json.dumps(out, default=float))
    else:
        _print_table(out)
    return 0


def _cmd_engine_bench(args: argparse.Namespace, cfg: SessionConfig, out: dict[str, Any]) -> int:
    from .gpu_bench import engine_figures, print_engine_table

    try:
        sessions = tuple(int(n) for n in args.sessions.split(","))
    except ValueError:
        print(f"error: --sessions takes counts like 1,2,4,8, got {args.sessions!r}", file=sys.stderr)
        return 2
    if not sessions or min(sessions) < 1:
        print("error: --sessions counts must be >= 1", file=sys.stderr)
        return 2
    try:
        out.update(flops_figures(cfg))
    except FileNotFoundError as exc:  # a GPU machine without ../shared/reference: the engine figures still come
        print(f"note: FLOPs not counted ({exc})", file=sys.stderr)
    out["gpu"] = engine_figures(
        device=args.device,
        dtype=args.dtype,
        model_size=args.model_size,
        model_dir=args.model_dir,
        width=args.width or 512,
        height=args.height or 512,
        sessions=sessions,
        seconds=args.seconds,
        session_config=cfg,
        max_batch=args.max_batch,
        components=not args.no_components,
        eager=args.eager,
        pipelined=_pipelined(args.pipelined),
        serial=args.serial,
        idle_motion=args.idle_motion,
    )
    if "skipped" in out["gpu"]:
        print(f"note: engine bench skipped: {out['gpu']['skipped']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, default=float))
    else:
        print(f"settings: {out['settings']}")
        print_engine_table(out["gpu"])
        if "idle_motion" in out["gpu"]:
            from .idle_motion import print_idle_motion

            print_idle_motion(out["gpu"]["idle_motion"])
    return 0


def _print_table(out: dict[str, Any]) -> None:
    rows = [
        ("FLOPs per frame (engine, TFLOP)", out["flops_per_frame"] / 1e12),
        ("FLOPs per frame (original defaults, TFLOP)", out["original_flops_per_frame"] / 1e12),
        ("ratio original / engine", out["flops_ratio"]),
        ("ratio with the tiny decoder", out["flops_ratio_tiny_decoder"]),
        ("worker", "pipelined" if out["pipelined"] else "serial"),
        (f"real-time factor ({out['device']})", out["realtime_factor"]),
        ("latency p50 (ms)", out["latency_p50_ms"]),
        ("latency p95 (ms)", out["latency_p95_ms"]),
        ("engine overhead p95 (ms)", out["overhead_p95_ms"]),
        (f"latency p95 first {out['minute_s']:g} s (ms)", out["latency_p95_first_minute_ms"]),
        (f"latency p95 last {out['minute_s']:g} s (ms)", out["latency_p95_last_minute_ms"]),
        ("underruns / dropped frames", f"{out['underruns']} / {out['dropped_frames']}"),
    ]
    print(f"settings: {out['settings']}")
    for name, value in rows:
        print(f"  {name:<45} {value:>10.2f}" if isinstance(value, float) else f"  {name:<45} {value:>10}")
    if "idle_motion" in out:
        from .idle_motion import print_idle_motion

        print_idle_motion(out["idle_motion"])
    for key in ("strategies", "loop_lag"):
        if key in out:
            print(f"{key}:")
            print(json.dumps(out[key], indent=2, default=float))
