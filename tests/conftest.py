"""Shared test fixtures: a tiny random model, a portrait and speech that the suite builds itself, and the golden
fixtures (only the parity tests need them; they skip without them, except in CI, where nothing skips silently)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from kit import tiny_model
from kit.paths import REPO_ROOT
from kit.skips import CI_ALLOWED_SKIP_REASONS, IN_CI, skip_or_fail

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURES = Path(os.environ.get("VEXPRESS_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "vexpress-tiny"))
REFERENCE = Path(os.environ.get("VEXPRESS_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI, a skip from anywhere (importorskip, a helper's pytest.skip) counts as a failure unless its reason
    is one of CI_ALLOWED_SKIP_REASONS."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in CI_ALLOWED_SKIP_REASONS):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI (CI=true): {reason}"


# -- the golden fixtures (../shared): parity tests only ----------------------------------------------------------------
@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "model_ckpts").is_dir():
        skip_or_fail(f"golden fixtures not found at {FIXTURES} (set VEXPRESS_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "vexpress_checkpoint_manifest.json").is_file():
        skip_or_fail(f"reference manifest not found at {REFERENCE} (set VEXPRESS_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def fixture_models(fixtures_dir):
    """The golden fixture set's tiny V-Express (the weights the expected outputs were made with), fp32, CPU."""
    import torch

    from vexpress_rt.loader import load_models
    from vexpress_rt.weights import ModelPaths

    return load_models(ModelPaths.from_model_dir(fixtures_dir / "model_ckpts"), dtype=torch.float32)


@pytest.fixture(scope="session")
def fixture_speech(fixtures_dir):
    """The fixture set's 1.3 s of espeak-ng speech: 16 kHz mono float32, int16 / 32768 as torchaudio reads it."""
    import wave

    import numpy as np

    with wave.open(str(fixtures_dir / "inputs" / "audio.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


# -- what the suite builds itself --------------------------------------------------------------------------------------
def _cached_build(request, name: str, build) -> Path:
    """A folder built once and kept in pytest's cache dir under the build version; a half-written one (an
    interrupted run) is rebuilt. Without the cache plugin (`-p no:cacheprovider`) it is built in this run's tmp dir."""
    key = f"vexpress-{tiny_model.BUILD_VERSION}"
    cache = getattr(request.config, "cache", None)  # absent when the cache plugin is disabled
    base = Path(cache.mkdir(key)) if cache is not None else request.getfixturevalue("tmp_path_factory").mktemp(key)
    target, done = base / name, base / f"{name}.complete"
    if not done.is_file():
        shutil.rmtree(target, ignore_errors=True)
        build(target)
        done.write_text(tiny_model.BUILD_VERSION)
    return target


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """A tiny random model folder in the released layout (passes strict loading and check-weights)."""
    return _cached_build(request, "model_ckpts", tiny_model.build_model_dir)


@pytest.fixture(scope="session")
def tiny_speech():
    """1.3 s of speech, 16 kHz mono float32: espeak-ng when installed (required in CI), else a synthetic voice."""
    speech = tiny_model.espeak_voice("Hello, this is a short test of the talking head.")
    if speech is None:
        if IN_CI:
            pytest.fail("CI=true and espeak-ng is not installed (apt-get install espeak-ng)", pytrace=False)
        speech = tiny_model.synthetic_voice()
    return speech


@pytest.fixture(scope="session")
def inputs_dir(request, tiny_speech) -> Path:
    """reference.png, reference_kps.npy, kps.pth, kps_sequence.npy and audio.wav, in the fixture set's formats."""
    return _cached_build(request, "inputs", lambda root: tiny_model.build_inputs(root, tiny_speech))


@pytest.fixture(scope="session")
def tiny_portrait(inputs_dir):
    """(RGB image, its first three key points in the 128 x 64 frame), as the engine takes them."""
    import numpy as np
    from PIL import Image

    image = Image.open(inputs_dir / "reference.png").convert("RGB")
    return image, np.load(inputs_dir / "reference_kps.npy")[:3].astype(np.float32)


@pytest.fixture(scope="session")
def tiny_models(model_dir):
    """The tiny V-Express, loaded once in fp32 on the CPU."""
    import torch

    from vexpress_rt.loader import load_models
    from vexpress_rt.weights import ModelPaths

    return load_models(ModelPaths.from_model_dir(model_dir), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_engine(tiny_models):
    """A started streaming engine on the tiny model at 128x64, shared by the server tests. Admission control is
    off: the tiny model on a small CPU is slower than real time, and the stream must flow anyway."""
    from streaming.engine import Engine, EngineConfig

    engine = Engine(tiny_models, EngineConfig(width=128, height=64, max_sessions=8, admission=False))
    engine.start()
    yield engine
    engine.close()


@pytest.fixture
def serve(request):
    """Servers started in a test, stopped after it: `serve(max_sessions=2)` is a started `ServerThread` over
    `tiny_engine` with the tests' settings (kit/served.py); `serve(engine=pool, ...)` over another engine."""
    from kit.served import Servers  # here, not above: the GPU machine's tests run without the server's dependencies

    servers = Servers(lambda: request.getfixturevalue("tiny_engine"))
    yield servers.start
    servers.stop_all()
