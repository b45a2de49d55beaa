"""Admission control's cost model: given measured seconds per call by batch size, which sessions it admits."""

from __future__ import annotations

import pytest

from streaming.cost_model import CostModel, Demand, PipelinedCost, Span
from streaming.denoiser import DenoiserSettings
from streaming.params import GenerationParams

DEFAULT = DenoiserSettings.of(GenerationParams(steps=4, new_frames=2, strategy="staggered"))  # 12.5 calls a second


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
    two_steps = DenoiserSettings.of(GenerationParams(steps=2, new_frames=2, strategy="staggered"))  # 4 passes, not 8
    assert model.call_seconds(two_steps, 4) == pytest.approx(0.036)
    mixed = [Demand(DEFAULT, 25), Demand(two_steps, 25)]  # different settings never share a call
    assert model.load(mixed, 4) == pytest.approx(0.040 * 12.5 + 0.020 * 12.5)


def test_audio_features_count_per_session():
    model = _model({1: 0.040, 2: 0.056})
    model.record_features(0.004)
    assert _load(model, 2) == pytest.approx(0.056 * 12.5 + 2 * 0.004 * 12.5)


def _pipelined(spans: list[tuple[tuple[float, float], tuple[float, float]]]) -> list[float]:
    """Costs of consecutive pipelined calls from their recorded (UNet, decode) spans, in ms."""
    cost = PipelinedCost()
    return [round(1000 * cost.call(Span(*u), Span(*d)), 3) for u, d in spans]


def test_pipelined_calls_count_the_decode_overlap_once():
    """Saturated: UNet calls of 40 ms back to back, each call's 30 ms decode entirely under the next UNet call.
    The device makes a call every 40 ms; the old account (UNet span + decode span) said 70 ms and refused
    sessions the card serves."""
    spans = [((0.040 * i, 0.040 * (i + 1)), (0.040 * (i + 1), 0.040 * (i + 1) + 0.030)) for i in range(4)]
    assert _pipelined(spans) == [70.0, 40.0, 40.0, 40.0]  # the first call has no UNet to hide its decode


def test_pipelined_decode_longer_than_the_next_unet_call_counts_what_sticks_out():
    """A 50 ms decode beside 40 ms UNet calls: 10 ms of each decode overlaps nothing."""
    spans = [((0.050 * i, 0.050 * i + 0.040), (0.050 * i + 0.040, 0.050 * i + 0.090)) for i in range(3)]
    assert _pipelined(spans)[1:] == [50.0, 50.0]


def test_idle_time_between_pipelined_calls_is_not_cost():
    """Not saturated: a 40 ms UNet call every 100 ms and a 20 ms decode after it (overlapping nothing): each call
    costs 60 ms of device time, not the 100 ms between UNet completions."""
    spans = [((0.1 * i, 0.1 * i + 0.040), (0.1 * i + 0.040, 0.1 * i + 0.060)) for i in range(3)]
    assert _pipelined(spans) == [60.0, 60.0, 60.0]
