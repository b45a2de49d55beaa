"""The GPU machine's environment (../shared/docs/GPU.md) rebuilt from this one: aiortc, websockets and
prometheus_client blocked at import (tests/kit/gpu_env/sitecustomize.py), no CUDA device. The bench and
scripts/gpu_check.sh must run there: a GPU run that dies at import costs the whole lent machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kit.paths import KIT, REPO_ROOT

REPO = REPO_ROOT
BLOCKER = KIT / "gpu_env"


def _gpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BLOCKER), str(REPO)])  # the blocker first: it is `sitecustomize`
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA device, even on a machine that has one
    env["PYTHON"] = sys.executable
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=_gpu_env(), capture_output=True, text=True, timeout=timeout)


def test_the_blocker_makes_the_server_unimportable():
    """The environment is the GPU machine's: `python -m server` cannot start there (why the bench must not need it)."""
    probe = _run([sys.executable, "-c", "import server.cli"], timeout=120)
    assert probe.returncode != 0 and "not on the GPU machine" in probe.stderr


def test_the_bench_runs_without_the_server_packages():
    """`python -m streaming.bench --gpu --device cpu` (the path gpu_check.sh runs, at tiny size): the engine on
    the CPU, one session, every figure; nothing of `server` imported."""
    args = ["--gpu", "--device", "cpu", "--dtype", "fp32", "--json", "--sessions", "1", "--seconds", "1.5"]
    args += ["--no_components", "--width", "128", "--height", "64", "--max_batch", "1"]
    done = _run([sys.executable, "-m", "streaming.bench", *args], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    gpu = json.loads(done.stdout.strip().splitlines()[-1])["gpu"]
    assert gpu["device"] == "cpu" and gpu["runs"][0]["sessions"] == 1
    assert gpu["runs"][0]["frames_generated"] > 0  # the CPU is far from real time: frames made, not fps


def test_gpu_check_runs_end_to_end_and_skips_without_cuda(tmp_path):
    """scripts/gpu_check.sh as on the GPU machine, without a CUDA device: every step runs (exit 0), the gpu
    tests skip and both bench runs print {"skipped": "no CUDA device"}."""
    done = _run(["bash", "scripts/gpu_check.sh", str(tmp_path)], timeout=600)
    assert done.returncode == 0, done.stdout + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert json.loads((tmp_path / "env.json").read_text())["cuda"] is False
    for name in ("bench_gpu.json", "bench_gpu_n1.json"):
        assert json.loads((tmp_path / name).read_text())["gpu"] == {"skipped": "no CUDA device"}
    assert "skipped" in (tmp_path / "pytest_gpu.log").read_text()
