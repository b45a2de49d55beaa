"""FLOPs per output frame, counted on the meta device with the real-size architecture: positive, and consistent in
the ways a user comparing settings would notice."""

from __future__ import annotations

import pytest

from streaming.flops import (
    FlopBreakdown,
    _reference_net,
    engine_flops_per_frame,
    original_flops_per_frame,
    unet_call_flops,
)

TFLOP = 1e12


@pytest.fixture(scope="module")
def engine(reference_dir):
    return engine_flops_per_frame(reference_dir=reference_dir)


@pytest.fixture(scope="module")
def original(reference_dir):
    return original_flops_per_frame(reference_dir=reference_dir)


def test_counts_are_positive(original, engine):
    assert isinstance(original, FlopBreakdown)
    assert min(original.unet, original.decoder, original.audio, original.other) > 0
    assert min(engine.unet, engine.decoder, engine.audio) > 0
    assert engine.other == 0  # pre-encoded avatar: no reference net, guider or VAE encode
    assert original.total == pytest.approx(original.unet + original.decoder + original.audio + original.other)


def test_original_costs_more_than_engine(original, engine):
    ratio = original.total / engine.total
    print(f"\noriginal {original.total / TFLOP:.1f} TFLOP/frame, engine {engine.total / TFLOP:.1f}: {ratio:.1f}x")
    assert ratio > 1
    assert original.unet > engine.unet


def test_unet_scales_with_steps_and_cfg(reference_dir, engine):
    two = engine_flops_per_frame(steps=2, reference_dir=reference_dir)
    assert engine.unet == pytest.approx(2 * two.unet, rel=1e-9)
    cfg = engine_flops_per_frame(guidance_scale=3.5, reference_dir=reference_dir)
    assert cfg.unet == pytest.approx(2 * engine.unet, rel=1e-9)
    # the rest does not depend on steps or guidance
    assert (two.decoder, two.audio, cfg.decoder, cfg.audio) == (engine.decoder, engine.audio) * 2


def test_window_and_decoder_choices(reference_dir, engine):
    no_context = engine_flops_per_frame(window_frames=4, reference_dir=reference_dir)
    # half the frames per call; slightly less than half because the motion attention is quadratic in frames
    assert 0.45 < no_context.unet / engine.unet <= 0.5
    tiny = engine_flops_per_frame(decoder="tiny", reference_dir=reference_dir)
    assert tiny.unet == engine.unet
    assert tiny.decoder < engine.decoder / 5
    with pytest.raises(ValueError):
        engine_flops_per_frame(decoder="jpeg", reference_dir=reference_dir)


def test_unet_frame_pass_order_of_magnitude(reference_dir):
    # the reference net is the plain 2-D SD-1.5 UNet: about 0.8 TFLOP per 64x64 latent
    assert 0.7 < _reference_net(str(reference_dir), 512, 512) / TFLOP < 0.9
    # ours adds reference attention and motion modules
    per_pass = unet_call_flops(frames=8, reference_dir=reference_dir) / 8
    assert 0.6 < per_pass / TFLOP < 3
    # the original projects the reference K/V again in every call
    assert unet_call_flops(frames=8, project_reference_kv=True, reference_dir=reference_dir) / 8 > per_pass
