"""Device placement without a GPU: the models and the avatars live on the `meta` device (shapes only), so any
tensor a call makes on the CPU and mixes in raises ("Tensor on device cpu is not on the expected device meta!").
That is the class of bug that made the engine crash on CUDA while registering the default portrait."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from streaming.audio_features import IncrementalAudioFeatures
from streaming.avatar import PreEncodedAvatar
from streaming.bench.random_models import random_models
from streaming.denoiser import ChunkJob, DenoiserSettings, StreamDenoiser
from streaming.params import GenerationParams
from streaming.unet_runner import RerunBackend
from streaming.wav2vec2_batch import encode_spans
from vexpress_rt.pipeline import GenerationSettings, denoise, video_length_for

META = torch.device("meta")
H, W = 8, 16  # latent size (a 128x64 frame)


class CpuTensorsMade(TorchDispatchMode):
    """Records every op that returns a CPU tensor of more than one element (noise drawn on the host, a table
    built per call): on a GPU each of those is a host computation plus a copy per call."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 1:
                self.ops.append(str(func))
        return out


@pytest.fixture(scope="module")
def meta_models():
    return random_models("tiny", device=META, dtype=torch.float16)


def _avatar(models, name: str) -> PreEncodedAvatar:
    latent = torch.empty(1, 4, H, W, device=META, dtype=models.dtype)
    kv = models.denoising_unet.reference_kv(models.reference_net(latent))
    kps = models.v_kps_guider(torch.empty(1, 3, 1, 8 * H, 8 * W, device=META, dtype=models.dtype))
    return PreEncodedAvatar(name, "random", 8 * W, 8 * H, np.zeros((3, 2), np.float32), latent, kv, kps)


def _silence(models) -> torch.Tensor:
    features = IncrementalAudioFeatures(models, 25)
    frames = features.push(np.zeros(16000, np.float32)) + features.end()
    return frames[len(frames) // 2].tokens


def test_audio_features_stay_on_the_model_device(meta_models):
    tokens = _silence(meta_models)
    assert tokens.device == META and tokens.dtype == meta_models.dtype


def test_batched_wav2vec2_stays_on_the_model_device(meta_models):
    """The worker's one wav2vec2 call over several sessions' spans: padding masks made for the model's device."""
    spans = [np.zeros(n, np.float32) for n in (8000, 12000, 4800)]
    hidden = encode_spans(meta_models, spans)
    assert [h.device for h in hidden] == [META] * 3 and all(h.dtype == meta_models.dtype for h in hidden)
    assert [h.shape[0] for h in hidden] == [24, 37, 14]  # each span's own frames (20 ms, 400-sample field)


@pytest.mark.parametrize("strategy", ["staggered", "chunked"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_stream_denoiser_batch_of_two_avatars_stays_on_the_model_device(meta_models, strategy, guidance, graphs):
    """`graphs`: the graph runner's static buffers and reference slots (a rerun stands in for the replay)."""
    params = GenerationParams(steps=2, new_frames=2, context_frames=2, strategy=strategy, guidance_scale=guidance)
    settings = DenoiserSettings.of(params)
    denoiser = StreamDenoiser(meta_models, settings, RerunBackend() if graphs else None)
    silence = torch.empty(5, 768, device=META, dtype=meta_models.dtype)  # (queries, width) audio tokens
    avatars = [_avatar(meta_models, "a"), _avatar(meta_models, "b")]
    states = [denoiser.new_state(a, seed=i, silence=silence) for i, a in enumerate(avatars)]
    tokens = silence[None].expand(2, -1, -1)
    with CpuTensorsMade() as made:
        for turn in range(2):  # the second call runs on the state the first one left
            jobs = [ChunkJob(s, a, tokens, [(turn, k) for k in range(2)], params) for s, a in zip(states, avatars)]
            outputs = denoiser.run(jobs)
    assert made.ops == [], f"CPU tensors made during a denoiser call: {sorted(set(made.ops))}"
    frames = [latent for out in outputs for _, latent in out]
    assert frames and all(f.device == META and f.shape == (4, H, W) for f in frames)
    # a single stream reset onto other frames (speech continuing from the idle clip) stays there too
    denoiser.set_context(states[0], torch.empty(4, 3, H, W, device=META), tokens[:1].expand(3, -1, -1))
    assert denoiser.run([ChunkJob(states[0], avatars[0], tokens, [0, 1])])[0][0][1].device == META


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_offline_denoising_loop_stays_on_the_model_device(meta_models, guidance):
    settings = GenerationSettings(
        width=8 * W, height=8 * H, num_inference_steps=2, guidance_scale=guidance, context_frames=4, context_overlap=1
    )
    length = video_length_for(16000 * 7 // 25, 25.0, 4, 1)  # 7 frames: two overlapping windows
    avatar = _avatar(meta_models, "a")
    bank = meta_models.reference_net(avatar.latent)
    noise = torch.empty(1, 4, length.frames, H, W, dtype=meta_models.dtype)  # drawn on the host, as the original
    tokens = torch.empty(length.frames, 5, 768, device=META, dtype=meta_models.dtype)
    latents = denoise(meta_models, noise, bank, avatar.kps_feature, tokens, length.windows, settings)
    assert latents.device == META and latents.shape == noise.shape
