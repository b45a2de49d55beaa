"""`vexpress-rt bench`: the figures a user reads, from a short real run on the tiny model."""

from __future__ import annotations

import json
import math

from streaming.gpu_bench import gpu_figures


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
    assert out["original_flops_per_frame"] > 5 * out["flops_per_frame"]  # cached reference, no CFG, few steps
    assert out["realtime_factor"] > 0
    assert 0 < out["latency_p50_ms"] <= out["latency_p95_ms"]


def test_gpu_figures_skip_cleanly_without_cuda():
    import torch

    figures = gpu_figures(quick=True)
    if torch.cuda.is_available():
        assert figures["runs"] and all(r["fps"] > 0 for r in figures["runs"])
    else:
        assert figures == {"skipped": "no CUDA device"}
