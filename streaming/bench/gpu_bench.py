"""`bench --gpu`: the whole engine on a device, measured as the server runs it.

Real-size modules with random weights built in memory (same speed as the released weights; or `--model_dir`),
fp16 or bf16, 512x512 by default. The default portrait is registered through `Engine.add_avatar`; then N
concurrent sessions (1, 2, 4, 8 by default; the ramp stops once the engine is far past capacity) are each fed speech
in real time in 20 ms pushes and read at their fps. Per N: delivered fps per session, latency from audio arrival to
frame ready (p50/p95, p95 of the first vs the second half), underruns, the worker's busy fraction, device
milliseconds per output frame by stage (audio features, UNet, decode, host copies; CUDA events) and peak memory.
A `components` section times the UNet window and the VAE decode alone at 1-8 steps. The worker is pipelined on
CUDA (decode, host copy and delivery on a second thread, streaming/finisher.py); `serial` adds the serial worker's
figures at the first two session counts from the same run, for the side-by-side.

`--device cpu` runs the same code at tiny size (CI); the GPU path differs only in device and dtype.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vexpress_rt.loader import VExpressModels
from vexpress_rt.models import UNetConfig

from ..avatar import PreEncodedAvatar
from ..decoder import FrameDecoder, load_decoders
from ..denoiser import DenoiserSettings, Schedule
from ..device import synchronize
from ..engine import Engine, EngineConfig
from ..params import GenerationParams
from ..portrait import load_default_portrait
from ..session import SessionConfig
from ..sim.device import simulated_device
from ..sim.profile import is_simulated
from ..stage_timer import StageTimer
from ..unet_runner import CaptureBackend, CudaGraphBackend, EagerUNet, GraphedUNet, RerunBackend
from .speech import speech

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PUSH_SAMPLES = 320  # 20 ms at 16 kHz, as the server's clients push
FAR_PAST_CAPACITY = 0.5  # stop the ramp once sessions get less than this fraction of their fps


def _models(device: torch.device, dtype: torch.dtype, model_size: str, model_dir: str | None) -> VExpressModels:
    if model_dir:
        from vexpress_rt.loader import load_models
        from vexpress_rt.weights import ModelPaths

        loaded: VExpressModels = load_models(ModelPaths.from_model_dir(Path(model_dir)), device=device, dtype=dtype)
        return loaded
    from .random_models import random_models

    return random_models(model_size, device=device, dtype=dtype)


def _decoders(models: VExpressModels, model_dir: str | None) -> dict[str, FrameDecoder]:
    """Both live decoders: from the model folder (TAESD when present), else TAESD's architecture with random
    weights beside the full VAE (the same speed as its released weights)."""
    if model_dir:
        from vexpress_rt.weights import ModelPaths

        return load_decoders(models, "auto", ModelPaths.from_model_dir(Path(model_dir)).taesd_path)[1]
    from diffusers import AutoencoderTiny

    tiny: Any = AutoencoderTiny()
    tiny = tiny.to(models.device, models.dtype).eval().requires_grad_(False)
    return {"full": FrameDecoder.full(models), "tiny": FrameDecoder.tiny(tiny)}


@torch.no_grad()
def engine_figures(
    device: str | torch.device = "cuda",
    dtype: str = "fp16",
    model_size: str | None = None,
    model_dir: str | None = None,
    width: int = 512,
    height: int = 512,
    sessions: tuple[int, ...] = (1, 2, 4, 8),
    seconds: float = 10.0,
    session_config: SessionConfig | None = None,
    max_batch: int = 4,
    components: bool = True,
    eager: bool = False,
    pipelined: bool | None = None,
    serial: bool = False,
    idle_motion: bool = False,
) -> dict[str, Any]:
    """The engine's figures on `device` as one JSON-ready dict; {"skipped": ...} when CUDA is asked for and absent.
    On CUDA the UNet windows replay from CUDA graphs; `eager` adds the eager engine's figures at the first
    session count (`eager` key) from the same run, for the side-by-side. `pipelined`: the worker's mode (None:
    the engine's default, pipelined on CUDA); `serial` runs the main engine pipelined and adds the serial worker's
    figures at the first two session counts (`serial` key); `idle_motion` adds `bench --idle_motion`'s figures on
    the main engine (`idle_motion` key)."""
    if is_simulated(str(device)):
        return simulated_figures(
            str(device), dtype, width, height, sessions, seconds, session_config, max_batch, pipelined
        )
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    model_size = model_size or ("real" if device.type == "cuda" else "tiny")
    cfg = session_config or SessionConfig()
    cfg.validate()
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": dtype,
        "model": model_dir or f"random weights, {model_size} size",
        "width": width,
        "height": height,
        "seconds_per_run": seconds,
    }
    t0 = time.perf_counter()
    models = _models(device, DTYPES[dtype], model_size, model_dir)
    synchronize(device)
    decoders = _decoders(models, model_dir)
    out["model_load_s"] = time.perf_counter() - t0
    if cfg.decoder not in decoders:
        raise ValueError(f"decoder {cfg.decoder!r} is not in the model folder (have {sorted(decoders)})")
    out["decoder"] = cfg.decoder
    if serial and pipelined is None:
        pipelined = True
    # (name, graphs, pipelined, session counts): the eager comparison at one count (it is far past real time on a
    # GPU), the serial one at two (one session's latency, and what batching two does); same models, same run
    modes: list[tuple[str, bool | None, bool | None, Sequence[int]]] = [
        ("graphs" if device.type == "cuda" else "eager", None, pipelined, sessions)
    ]
    if eager and device.type == "cuda":
        modes.append(("eager", False, pipelined, sessions[:1]))
    if serial:
        modes.append(("serial", None, False, sessions[:2]))
    for name, graphs, pipe, counts in modes:
        main = name == modes[0][0]
        figures = _engine_figures(
            models, decoders, cfg, width, height, counts, seconds, max_batch, graphs, pipe, idle_motion and main
        )
        if main:
            out.update(figures)
            out["mode"] = name
        else:
            figures.pop("_avatar", None)  # the components use the main run's
            out[name] = figures
    if components:
        avatar, new_frames = out.pop("_avatar"), cfg.params.new_frames
        if device.type == "cuda":
            out["components"] = component_timings(models, avatar, new_frames)
        else:  # the CPU run checks the code path, not the speed: one step count, one call timed
            out["components"] = component_timings(models, avatar, new_frames, repeats=1, steps_list=(1,))
    out.pop("_avatar", None)
    return out


def simulated_figures(
    device: str,
    dtype: str,
    width: int,
    height: int,
    sessions: tuple[int, ...],
    seconds: float,
    session_config: SessionConfig | None,
    max_batch: int,
    pipelined: bool | None,
) -> dict[str, Any]:
    """The same engine run on a simulated device (`sim:h100`, streaming/sim/): every model call waits the time the
    profile measured on the GPU; the rest is this machine's real code (whose CPU load is in the figures)."""
    sim = simulated_device(device, width, height, dtype)
    cfg = session_config or SessionConfig()
    out: dict[str, Any] = {
        "device": f"{sim.name} (simulated from profile {sim.profile.name}: {sim.profile.device})",
        "simulated": sim.describe(),
        "dtype": dtype,
        "model": "none (simulated device)",
        "width": width,
        "height": height,
        "seconds_per_run": seconds,
        "model_load_s": 0.0,
        "decoder": cfg.decoder,
        "host_load_average": list(os.getloadavg()),
    }
    figures = _engine_figures(
        sim.models(),
        sim.decoders(),
        cfg,
        width,
        height,
        sessions,
        seconds,
        max_batch,
        None,
        True if pipelined is None else pipelined,
        engine_extra={"device_name": sim.name, "simulated": sim.describe()},
    )
    figures.pop("_avatar", None)
    out.update(figures)
    out["mode"] = "simulated"
    out["simulated_device_busy_s"] = sim.timeline.busy_s
    out["host_load_average_after"] = list(os.getloadavg())
    return out


def _engine_figures(
    models: VExpressModels,
    decoders: dict[str, FrameDecoder],
    cfg: SessionConfig,
    width: int,
    height: int,
    sessions: Sequence[int],
    seconds: float,
    max_batch: int,
    graphs: bool | None,
    pipelined: bool | None,
    idle_motion: bool = False,
    engine_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One engine on the loaded models: register the default portrait, warm up (graphs captured, cost per batch
    measured), then the session ramp."""
    device = models.device
    engine = Engine(
        models,
        EngineConfig(
            width=width,
            height=height,
            max_sessions=max(sessions),
            max_batch=max_batch,
            admission=False,
            graphs=graphs,
            pipelined=pipelined,
            default_session=cfg,
            **(engine_extra or {}),
        ),
        decoders,
    )
    out: dict[str, Any] = {"pipelined": engine.worker.pipelined}
    engine.stages = StageTimer(device)
    image, kps = load_default_portrait()
    t0 = time.perf_counter()
    info = engine.add_avatar(image, kps)
    synchronize(device)
    out["avatar_registration_s"] = time.perf_counter() - t0
    out["warmup"] = engine.warm_up(info.id)
    out["sessions_held_by_cost_model"] = engine.worker.costs.sessions_held(
        cfg.denoiser_settings(), cfg.fps, max_batch, engine.config.realtime_margin
    )
    out["runs"] = []
    engine.start()
    try:
        for n in sessions:
            run = sessions_run(engine, info.id, cfg, n, seconds)
            out["runs"].append(run)
            if run["delivered_fps_per_session"] < FAR_PAST_CAPACITY * cfg.fps:
                break  # far past capacity: more sessions only take longer to tell the same
        if idle_motion:
            from .idle_motion import idle_motion as idle_motion_figures

            out["idle_motion"] = idle_motion_figures(engine, info.id, cfg, rounds=2, idle_s=1.5)  # ~15 s
    finally:
        engine.close()
    out["_avatar"] = engine.avatar(info.id).encoded
    return out


def sessions_run(engine: Engine, avatar_id: str, cfg: SessionConfig, n: int, seconds: float) -> dict[str, Any]:
    """n sessions, each pushed `seconds` of speech in real time in 20 ms pushes and read at its fps."""

    device = engine.models.device
    opened = [engine.open_session(avatar_id, cfg.with_params(seed=cfg.params.seed + i)) for i in range(n)]
    pcm = speech(seconds)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.stages.reset()
    frames0 = engine.worker.frames_generated
    first_speech: dict[str, tuple[float, int]] = {}
    read = dict.fromkeys((s.id for s in opened), 0)
    pushed = 0
    start = time.monotonic()

    def read_due(now: float) -> None:
        for s in opened:
            while read[s.id] / cfg.fps <= now - start:
                s.read_frame()
                read[s.id] += 1
                if s.id not in first_speech and s.speech_frames_out:
                    first_speech[s.id] = (time.monotonic(), s.speech_frames_out)

    try:
        while pushed < len(pcm):
            now = time.monotonic()
            while pushed < len(pcm) and pushed / 16000 <= now - start:
                for s in opened:
                    s.push_audio(pcm[pushed : pushed + PUSH_SAMPLES])
                pushed += PUSH_SAMPLES
            read_due(now)
            time.sleep(0.004)
        push_end = time.monotonic()
        delivered = [
            (s.speech_frames_out - first_speech[s.id][1]) / max(push_end - first_speech[s.id][0], 1e-9)
            if s.id in first_speech
            else 0.0
            for s in opened
        ]
        for s in opened:
            s.end_utterance()
        deadline = push_end + max(5.0, seconds)  # a slow device: let the backlog play out, bounded
        while any(s.buffered_ms > 0 for s in opened) and time.monotonic() < deadline:
            read_due(time.monotonic())
            time.sleep(0.004)
        end = time.monotonic()
        frames = engine.worker.frames_generated - frames0
        stage_ms = engine.stages.totals_ms()
    finally:
        for s in opened:
            s.close()
    ids = {s.id for s in opened}
    latencies: list[float] = []
    first: list[float] = []
    second: list[float] = []
    for chunk in list(engine.worker.chunk_log):
        if chunk["session"] not in ids:
            continue
        for audio_time in chunk["audio_times"]:
            ms = 1000 * (chunk["ready"] - audio_time)
            latencies.append(ms)
            (first if audio_time - start < seconds / 2 else second).append(ms)

    p = percentile
    per_frame = {k: v / frames if frames else float("nan") for k, v in stage_ms.items()}
    return {
        "sessions": n,
        "delivered_fps_per_session": float(np.mean(delivered)),
        "delivered_fps_min": float(np.min(delivered)),
        "latency_p50_ms": p(latencies, 50),
        "latency_p95_ms": p(latencies, 95),
        "latency_p95_first_half_ms": p(first, 95),
        "latency_p95_second_half_ms": p(second, 95),
        "underruns": int(sum(s.underruns for s in opened)),
        "dropped_frames": int(sum(s.dropped_frames for s in opened)),
        "frames_generated": int(frames),
        "worker_busy_fraction": engine.worker.compute_between(start, end) / (end - start),
        "device_ms_per_frame": per_frame,
        "device_ms_per_frame_total": float(sum(per_frame.values())),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, NaN when nothing was measured."""
    return float(np.percentile(values, q)) if values else float("nan")


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    for _ in range(2):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def component_timings(
    models: VExpressModels,
    avatar: PreEncodedAvatar,
    new_frames: int = 2,
    repeats: int = 10,
    steps_list: Sequence[int] = (1, 2, 4, 8),
    batches: Sequence[int] = (1, 4),
) -> list[dict[str, Any]]:
    """One staggered UNet window (eager and replayed from a captured graph) and the VAE decode of the frames it
    finishes, alone, at 1-8 steps, batch 1 and 4: call times, UNet TFLOP/s (when the FLOPs can be counted), fps
    and the sessions at 25 fps it implies (graph UNet + VAE decode). On a CPU the 'graph' is re-run eagerly
    (the CPU stand-in for capture), so CI runs this very code."""
    unet, vae, device, dtype = models.denoising_unet, models.vae, models.device, models.dtype
    _, _, h, w = avatar.latent.shape
    backend: CaptureBackend = CudaGraphBackend(device) if device.type == "cuda" else RerunBackend()
    graphed, eager = GraphedUNet(unet, backend), EagerUNet(unet)
    real_size = models.unet_config == UNetConfig()  # the FLOP count is the released model's
    runs = []
    for steps in steps_list:
        settings = DenoiserSettings.of(GenerationParams(steps=steps, new_frames=new_frames, strategy="staggered"))
        frames = settings.window_frames
        schedule = Schedule(steps, device)
        for batch in batches:
            x = torch.randn(batch, 4, frames, h, w, device=device, dtype=dtype)
            tokens = torch.randn(batch * frames, 5, models.unet_config.cross_attention_dim, device=device, dtype=dtype)
            t = schedule.timesteps.repeat_interleave(new_frames).repeat(batch)
            z = torch.randn(batch * new_frames, 4, h, w, device=device, dtype=dtype)
            refs = [avatar] * batch
            weights = {  # the runners' named per-row inputs (streaming/controls.py)
                "kps_features": avatar.kps_feature.expand(batch, -1, frames, -1, -1),
                "reference_attention_weight": torch.full((batch,), 0.95, device=device),
                "audio_attention_weight": torch.full((batch,), 3.0, device=device),
            }
            unet_s = _time(partial(eager, x, t, tokens, refs, **weights), repeats, device)
            graph_s = _time(partial(graphed, x, t, tokens, refs, **weights), repeats, device)
            decode_s = _time(partial(vae.decode, z), repeats, device)
            flops = _unet_flops(frames, batch, 8 * h, 8 * w) if real_size else None
            fps = batch * new_frames / (graph_s + decode_s)
            runs.append(
                {
                    "steps": steps,
                    "batch": batch,
                    "window_frames": frames,
                    "unet_ms": 1000 * unet_s,
                    "unet_graph_ms": 1000 * graph_s,
                    "unet_graph_tflops": flops / graph_s / 1e12 if flops else None,
                    "decode_ms": 1000 * decode_s,
                    "fps": fps,
                    "sessions_at_25fps": int(fps // 25),
                }
            )
    return runs


def _unet_flops(frames: int, batch: int, height: int, width: int) -> float | None:
    """FLOPs of one UNet window (meta-device count); None without ../shared/reference."""
    from .flops import unet_call_flops

    try:
        return unet_call_flops(frames, batch, width, height)
    except (FileNotFoundError, OSError):
        return None


def _print_runs(runs: list[dict[str, Any]]) -> None:
    head = (
        "N",
        "fps/sess",
        "p50 ms",
        "p95 ms",
        "p95 1st",
        "p95 2nd",
        "underruns",
        "busy",
        "ms/frame",
        "feat",
        "unet",
        "decode",
        "copy",
        "peak GiB",
    )
    print("  " + " ".join(f"{h:>9}" for h in head))
    for r in runs:
        st = r["device_ms_per_frame"]
        peak = r["peak_memory_gib"]
        cells = (
            r["sessions"],
            r["delivered_fps_per_session"],
            r["latency_p50_ms"],
            r["latency_p95_ms"],
            r["latency_p95_first_half_ms"],
            r["latency_p95_second_half_ms"],
            r["underruns"],
            r["worker_busy_fraction"],
            r["device_ms_per_frame_total"],
            st["audio_features"],
            st["unet"],
            st["decode"],
            st["host_copy"],
            "-" if peak is None else peak,
        )
        print("  " + " ".join(f"{c:>9.2f}" if isinstance(c, float) else f"{c:>9}" for c in cells))


def _worker(figures: dict[str, Any]) -> str:
    return "pipelined worker" if figures["pipelined"] else "serial worker"


def print_engine_table(out: dict[str, Any]) -> None:
    if "skipped" in out:
        print(f"engine on the device: skipped ({out['skipped']})")
        return
    print(
        f"engine on {out['device']} ({out['dtype']}, {out['model']}, {out['width']}x{out['height']}): "
        f"model load {out['model_load_s']:.1f} s, avatar registration {out['avatar_registration_s']:.1f} s"
    )
    warm = out["warmup"]
    print(
        f"  {out['mode']}, {_worker(out)}: warm-up {warm['warmup_s']:.1f} s, ms per call by batch "
        f"{warm['call_ms_by_batch']}; the cost model holds {out['sessions_held_by_cost_model']} sessions"
    )
    _print_runs(out["runs"])
    for name in ("eager", "serial"):
        if name in out:
            warm = out[name]["warmup"]
            print(
                f"  {name}, {_worker(out[name])}, same run: warm-up {warm['warmup_s']:.1f} s, ms per call by batch "
                f"{warm['call_ms_by_batch']}"
            )
            _print_runs(out[name]["runs"])
    if "components" in out:
        print("components (one staggered window through the UNet + the decode of its new frames):")
        for r in out["components"]:
            tflops = "-" if r["unet_graph_tflops"] is None else f"{r['unet_graph_tflops']:.0f}"
            print(
                f"  steps {r['steps']} batch {r['batch']}: UNet eager {r['unet_ms']:.1f} ms, graph "
                f"{r['unet_graph_ms']:.1f} ms ({tflops} TFLOP/s), decode {r['decode_ms']:.1f} ms, {r['fps']:.1f} fps,"
                f" {r['sessions_at_25fps']} sessions at 25 fps"
            )
