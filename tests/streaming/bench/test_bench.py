"""`vexpress-rt bench`: the figures a user reads, from a short real run on the tiny model."""

from __future__ import annotations

import json
import math

import pytest

from streaming.bench.gpu_bench import engine_figures


def test_bench_quick_json_prints_every_figure(model_dir, capsys):
    from server.cli import main

    assert (
        main(
            [
                "bench",
                "--quick",
                "--json",
                "--minutes",
                "0.05",
                "--steps",
                "2",
                "--model_dir",
                str(model_dir),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "flops_per_frame",
        "original_flops_per_frame",
        "realtime_factor",
        "latency_p50_ms",
        "latency_p95_ms",
        "overhead_p95_ms",
        "latency_p95_first_minute_ms",
        "latency_p95_last_minute_ms",
    ):
        assert isinstance(out[key], float) and math.isfinite(out[key]), key
    # The FLOP figures at 2 steps (staggered, 2 new frames, no CFG), as `python -m streaming.bench.flops` counts them at
    # real size: 78.1 TFLOP per frame for the original's defaults, 5.02 for ours (UNet 2.50 + full VAE decoder 2.51),
    # 15.6x fewer; 29.5x with the tiny decoder. Tolerance: the last printed digit.
    assert out["original_flops_per_frame"] / 1e12 == pytest.approx(78.1, abs=0.05)
    assert out["flops_per_frame"] / 1e12 == pytest.approx(5.02, abs=0.005)
    assert out["flops_ratio"] == pytest.approx(15.55, abs=0.05)
    assert out["flops_ratio_tiny_decoder"] == pytest.approx(29.5, abs=0.05)
    assert out["flops_ratio"] == pytest.approx(out["original_flops_per_frame"] / out["flops_per_frame"])
    assert out["realtime_factor"] > 0
    # Latency from audio arrival to frame ready: ordered percentiles; the engine's own overhead (latency minus model
    # compute minus waiting for audio) is a part of the latency, never more than it.
    assert 0 < out["latency_p50_ms"] <= out["latency_p95_ms"]
    assert 0 <= out["overhead_p95_ms"] <= out["latency_p95_ms"]
    assert out["latency_p95_first_minute_ms"] > 0 and out["latency_p95_last_minute_ms"] > 0


def test_engine_bench_skips_cleanly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tests/streaming/test_gpu.py and scripts/gpu_check.sh measure it")
    assert engine_figures(device="cuda") == {"skipped": "no CUDA device"}


def test_engine_bench_on_cpu_runs_sessions_and_reports_every_figure(capsys):
    """The same path as `bench --gpu`, at tiny size on the CPU: the default portrait, then one session fed speech
    in real time; a short, bounded run."""
    from server.cli import main

    args = ["bench", "--gpu", "--device", "cpu", "--dtype", "fp32", "--json", "--sessions", "1", "--seconds", "1.5"]
    assert main(args + ["--width", "128", "--height", "64"]) == 0
    gpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gpu"]
    assert gpu["model_load_s"] > 0 and gpu["avatar_registration_s"] > 0
    assert gpu["mode"] == "eager" and sorted(gpu["warmup"]["call_ms_by_batch"]) == ["1", "2", "4"]
    (run,) = gpu["runs"]
    assert run["sessions"] == 1 and run["frames_generated"] > 0
    assert 0 < run["latency_p50_ms"] <= run["latency_p95_ms"]
    assert 0 < run["worker_busy_fraction"] <= 1.0
    stages = run["device_ms_per_frame"]
    assert set(stages) == {"audio_features", "unet", "decode", "host_copy"} and all(v > 0 for v in stages.values())
    assert run["peak_memory_gib"] is None  # CPU: no device memory figure
    # The component timings run the same code as on a GPU (graphs re-run eagerly on the CPU; one step count
    # there), each UNet window and decode timed.
    components = gpu["components"]
    assert [(c["steps"], c["batch"]) for c in components] == [(1, 1), (1, 4)]
    assert all(c["unet_ms"] > 0 and c["unet_graph_ms"] > 0 and c["decode_ms"] > 0 for c in components)
    assert all(c["unet_graph_tflops"] is None for c in components)  # FLOPs are counted for the released size only


def test_engine_bench_puts_the_serial_worker_beside_the_pipelined_one(capsys):
    """`--serial`: the engine runs with the pipelined worker, and the serial one's figures come from the same run
    (the CPU checks the path; which is faster is for the GPU run to say)."""
    from server.cli import main

    args = ["bench", "--gpu", "--device", "cpu", "--dtype", "fp32", "--json", "--sessions", "1", "--seconds", "1.5"]
    assert main(args + ["--width", "128", "--height", "64", "--no_components", "--serial"]) == 0
    gpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gpu"]
    assert gpu["pipelined"] is True and gpu["serial"]["pipelined"] is False
    for runs in (gpu["runs"], gpu["serial"]["runs"]):
        (run,) = runs
        assert run["frames_generated"] > 0 and 0 < run["latency_p50_ms"] <= run["latency_p95_ms"]


def test_idle_motion_bench_puts_live_idle_beside_the_clip():
    """`bench --idle_motion`: a fix_face session idles for free on its clip, a nodding one generates its idle frames;
    both start speaking, and the figures say how long that took (a short, bounded run of one utterance each)."""
    from streaming.bench.command import _load_engine
    from streaming.bench.idle_motion import idle_motion
    from streaming.params import GenerationParams
    from streaming.session_config import SessionConfig

    cfg = SessionConfig(params=GenerationParams(steps=1))
    engine, info = _load_engine(None, 128, 64, cfg)
    try:
        out = idle_motion(engine, info.id, cfg, rounds=1, idle_s=1.0, speech_s=0.5)
    finally:
        engine.close()
    clip, nod = out["rows"]
    assert (clip["motion"], nod["motion"]) == ("fix_face", "nod")
    assert clip["idle_frames_generated_per_s"] == 0 and nod["idle_frames_generated_per_s"] > 5
    assert clip["utterances"] == nod["utterances"] == 1
    assert 0 < clip["speech_start_p50_ms"] < 10_000 and 0 < nod["speech_start_p50_ms"] < 10_000
