"""Incremental audio tokens: equal to the offline tokens with a whole-clip context, close and early with the
default bounded context, one token set per video frame."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from streaming.audio_features import SAMPLE_RATE, IncrementalAudioFeatures
from streaming.bench.random_models import TINY_WAV2VEC2
from streaming.wav2vec2_batch import encode_spans
from vexpress_rt.audio_features import audio_tokens


def _stream(tiny_models, audio, chunk, **kwargs):
    stream = IncrementalAudioFeatures(tiny_models, fps=25, **kwargs)
    emitted, pushed = [], []
    for start in range(0, len(audio), chunk):
        for frame in stream.push(audio[start : start + chunk]):
            emitted.append(frame)
            pushed.append(min(len(audio), start + chunk))
    for frame in stream.end():
        emitted.append(frame)
        pushed.append(len(audio))
    return emitted, pushed


@pytest.mark.parametrize("chunk", [20800, 320, 1000])
def test_whole_clip_context_equals_offline(tiny_models, tiny_speech, chunk):
    frames, _ = _stream(tiny_models, tiny_speech, chunk, left_context_s=10, lookahead_s=10)
    expected_frames = int(len(tiny_speech) / SAMPLE_RATE * 25)  # 1.3 s at 25 fps -> 32
    assert [f.index for f in frames] == list(range(expected_frames))
    offline = audio_tokens(tiny_models, tiny_speech, expected_frames)
    assert torch.allclose(torch.stack([f.tokens for f in frames]), offline, atol=1e-5)


def test_bounded_context_is_early(tiny_models, tiny_speech):
    frames, pushed = _stream(tiny_models, tiny_speech, 320)  # 20 ms pushes, default 2 s left context, 0.2 s lookahead
    assert [f.index for f in frames] == list(range(32))
    # A frame needs its +-2-frame window, 0.2 s of lookahead and one wav2vec2 receptive field: no more.
    for frame, samples in zip(frames[:-4], pushed[:-4]):
        deadline = ((frame.index + 3) / 25 + 0.2 + 0.025 + 0.02) * SAMPLE_RATE
        assert samples <= deadline, frame.index


def test_bounded_context_is_close_on_the_golden_model(fixture_models, fixture_speech):
    """How close bounded-context tokens come to whole-clip ones depends on the weights (how far wav2vec2's
    attention reaches): measured on the fixture set's model and speech, 0.071; 0.18-0.27 on the suite's own
    random model, whose attention happens to be less local."""
    frames, _ = _stream(fixture_models, fixture_speech, 320)
    tokens = torch.stack([f.tokens for f in frames])
    offline = audio_tokens(fixture_models, fixture_speech, 32)
    rel = ((tokens - offline).norm() / offline.norm()).item()
    assert rel < 0.15  # measured 0.071 on this clip


def test_memory_stays_bounded(tiny_models):
    stream = IncrementalAudioFeatures(tiny_models, fps=25, left_context_s=0.5, lookahead_s=0.1)
    rng = np.random.default_rng(0)
    count = 0
    for _ in range(60):  # 6 s of noise in 100 ms chunks
        count += len(stream.push(rng.standard_normal(1600).astype(np.float32) * 0.1))
        assert stream.held_samples < 1.5 * SAMPLE_RATE
    assert count >= 6 * 25 - 10


def _spans(models, speech: np.ndarray) -> list:
    """Four streams' next wav2vec2 runs, of four lengths: what one worker turn gathers from four sessions."""
    spans = []
    for k, (cut, chunk) in enumerate([(20800, 4000), (9000, 3000), (14000, 1600), (20800, 20800)]):
        stream = IncrementalAudioFeatures(models, fps=25, left_context_s=0.5 + 0.5 * k)
        audio = np.roll(speech, 1000 * k)[:cut]
        for start in range(0, cut - chunk, chunk):
            stream.plan(audio[start : start + chunk])  # earlier turns: the context these spans keep
        spans.append((stream, stream.plan(audio[cut - chunk :], end=k % 2 == 1)))
    return spans


def test_batched_wav2vec2_gives_each_stream_its_own_tokens(tiny_models, tiny_speech):
    """One wav2vec2 call over four streams' spans (zero-padded to the longest) gives each stream the hidden states
    and tokens its own run gives. A plain padded batch would not: wav2vec2-base's first GroupNorm and its
    attention see the padding (checked, so this test can tell the two apart)."""
    planned = _spans(tiny_models, tiny_speech)
    audio = [span.audio for _, spans in planned for span in spans]
    assert len(audio) >= 5 and len({len(a) for a in audio}) >= 4
    batched = encode_spans(tiny_models, audio)
    alone = [encode_spans(tiny_models, [a])[0] for a in audio]
    for b, a in zip(batched, alone):
        assert b.shape == a.shape
        assert torch.allclose(b, a, atol=1e-4), (b - a).abs().max()
    k = 0
    for stream, spans in planned:
        for span in spans:
            ours = torch.stack([f.tokens for f in stream.tokens(span, batched[k])])
            own = torch.stack([f.tokens for f in stream.tokens(span, alone[k])])
            assert torch.allclose(ours, own, atol=1e-4)
            k += 1
    values = [tiny_models.feature_extractor(a, sampling_rate=SAMPLE_RATE)["input_values"][0] for a in audio]
    padded = torch.zeros(len(values), max(len(v) for v in values))
    for row, v in zip(padded, values):
        row[: len(v)] = torch.from_numpy(v)
    with torch.no_grad():
        naive = tiny_models.audio_encoder(padded).last_hidden_state
    shortest = min(range(len(alone)), key=lambda i: len(audio[i]))
    assert (naive[shortest, : len(alone[shortest])] - alone[shortest]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["stable layer norm", "eager attention"])
def test_batched_wav2vec2_matches_on_the_other_variants(tiny_models, tiny_speech, variant):
    """wav2vec2's stable-layer-norm variant (per-frame LayerNorm in the feature encoder, norm after the layers) and
    the eager attention kernel batch as exactly as the base model with SDPA."""
    torch.manual_seed(0)
    settings = dict(TINY_WAV2VEC2)
    if variant == "stable layer norm":
        settings.update(feat_extract_norm="layer", do_stable_layer_norm=True)
    config = Wav2Vec2Config(**settings, attn_implementation="eager" if variant == "eager attention" else "sdpa")
    models = replace(tiny_models, audio_encoder=Wav2Vec2Model(config).eval())
    audio = [span.audio for _, spans in _spans(models, tiny_speech) for span in spans]
    for b, span in zip(encode_spans(models, audio), audio):
        assert torch.allclose(b, encode_spans(models, [span])[0], atol=1e-4)
