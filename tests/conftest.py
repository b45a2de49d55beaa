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
