"""Shared test helpers: where the golden fixtures live, and a skip when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("VEXPRESS_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "vexpress-tiny"))
REFERENCE = Path(os.environ.get("VEXPRESS_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "model_ckpts").is_dir():
        pytest.skip(f"golden fixtures not found at {FIXTURES} (set VEXPRESS_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "vexpress_checkpoint_manifest.json").is_file():
        pytest.skip(f"reference manifest not found at {REFERENCE} (set VEXPRESS_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_models(fixtures_dir):
    """The fixture's tiny V-Express, loaded once in fp32 on the CPU."""
    import torch

    from vexpress_rt.loader import load_models
    from vexpress_rt.weights import ModelPaths

    return load_models(ModelPaths.from_model_dir(fixtures_dir / "model_ckpts"), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_speech(fixtures_dir):
    """The fixture's 1.3 s of espeak-ng speech: 16 kHz mono float32, int16 / 32768 as torchaudio reads it."""
    import wave

    import numpy as np

    with wave.open(str(fixtures_dir / "inputs" / "audio.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


@pytest.fixture(scope="session")
def tiny_engine(tiny_models):
    """A started streaming engine on the tiny model at 128x64, shared by the server tests. Admission control is
    off: the tiny model on a small CPU is slower than real time, and the stream must flow anyway."""
    from streaming.engine import Engine, EngineConfig

    engine = Engine(tiny_models, EngineConfig(width=128, height=64, max_sessions=8, admission=False))
    engine.start()
    yield engine
    engine.close()
