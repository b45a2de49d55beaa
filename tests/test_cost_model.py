"""Admission control's cost model: given measured seconds per call by batch size, which sessions it admits."""

from __future__ import annotations

import pytest

from streaming.cost_model import CostModel, Demand
from streaming.denoiser import DenoiserSettings

DEFAULT = DenoiserSettings(steps=4, new_frames=2, strategy="staggered")  # 12.5 calls per second at 25 fps


def _model(costs: dict[int, float], settings: DenoiserSettings = DEFAULT) -> CostModel:
    model = CostModel()
    for batch, seconds in costs.items():
        model.record_call(settings, batch, seconds)
    return model


def _load(model: CostModel, sessions: int, settings: DenoiserSettings = DEFAULT, max_batch: int = 4) -> float:
    return model.load([Demand(settings, 25)] * sessions, max_batch)


def test_nothing_measured_refuses_nothing():
    assert CostModel().load([Demand(DEFAULT, 25)], 4) is None


def test_batching_that_pays_admits_what_a_per_pass_figure_would_refuse():
    """40 ms for one window, 56 ms for two, 72 ms for four (graph replays): 1 session takes half the worker,
    2 take 70 %, 3 and 4 run as one padded batch of 4 (90 %). Scaling the single call would refuse the second."""
    model = _model({1: 0.040, 2: 0.056, 4: 0.072})
    assert [round(_load(model, n), 3) for n in (1, 2, 3, 4)] == [0.5, 0.7, 0.9, 0.9]
    assert model.sessions_held(DEFAULT, 25, max_batch=4, margin=0.9) == 4
    assert model.sessions_held(DEFAULT, 25, max_batch=4, margin=0.85) == 2
    # beyond max_batch: a second call per chunk (4 + 1)
    assert _load(model, 5) == pytest.approx(0.9 + 0.5)


def test_unmeasured_batches_are_estimated_conservatively():
    model = _model({1: 0.040, 2: 0.056})
    assert model.call_seconds(DEFAULT, 1) == pytest.approx(0.040)
    assert model.call_seconds(DEFAULT, 4) == pytest.approx(0.112)  # linear from the largest measured batch
    assert _model({4: 0.072}).call_seconds(DEFAULT, 1) == pytest.approx(0.072)  # never more than a bigger batch


def test_other_settings_scale_by_their_frame_passes_per_call():
    model = _model({1: 0.040, 4: 0.072})
    two_steps = DenoiserSettings(steps=2, new_frames=2, strategy="staggered")  # 4 frame-passes per call, not 8
    assert model.call_seconds(two_steps, 4) == pytest.approx(0.036)
    mixed = [Demand(DEFAULT, 25), Demand(two_steps, 25)]  # different settings never share a call
    assert model.load(mixed, 4) == pytest.approx(0.040 * 12.5 + 0.020 * 12.5)


def test_audio_features_count_per_session():
    model = _model({1: 0.040, 2: 0.056})
    model.record_features(0.004)
    assert _load(model, 2) == pytest.approx(0.056 * 12.5 + 2 * 0.004 * 12.5)
