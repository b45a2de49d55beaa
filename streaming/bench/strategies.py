"""Chunked windows vs staggered noise levels, measured side by side on the same audio (`bench --strategies`).

* agreement with the offline pipeline at equal steps: relative L2 distance of the latents to an offline run
  (windows of 12 frames overlapping by 4, same steps, no guidance), next to the distance between two offline runs
  that differ only in their seed (the floor: frames made from different noise differ that much anyway);
* boundary smoothness: the mean latent step between consecutive frames across a chunk boundary divided by the
  mean step inside chunks (1.0 = boundaries are invisible);
* latency: the audio a frame must wait for (its chunk, plus the staggered pipeline's depth) plus the measured
  compute of one call.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from vexpress_rt.audio_features import audio_tokens
from vexpress_rt.loader import VExpressModels
from vexpress_rt.pipeline import GenerationSettings, denoise, video_length_for

from ..avatar import AvatarInfo, PreEncodedAvatar
from ..denoiser import ChunkJob, DenoiserSettings, StreamDenoiser
from ..device import synchronize
from ..engine import Engine
from ..session import SessionConfig
from .speech import speech


def _speech16k(seconds: float) -> np.ndarray:
    return speech(seconds).astype(np.float32) / 32768


def _boundary_ratio(latents: torch.Tensor, period: int) -> float:
    steps = (latents[:, 1:] - latents[:, :-1]).abs().mean(dim=(0, 2, 3))  # step i: frame i -> i+1
    idx = torch.arange(len(steps), device=steps.device)
    across = (idx + 1) % period == 0
    return float(steps[across].mean() / steps[~across].mean())


def _offline(
    models: VExpressModels, avatar: PreEncodedAvatar, tokens: torch.Tensor, steps: int, seed: int, frames: int
) -> torch.Tensor:
    settings = GenerationSettings(num_inference_steps=steps, guidance_scale=1.0, context_frames=12, context_overlap=4)
    length = video_length_for(int(frames / 25 * 16000) + 1, 25.0, 12, 4)
    n = length.frames
    g = torch.Generator().manual_seed(seed)
    h, w = avatar.latent.shape[-2:]
    noise = torch.randn((1, 4, n, h, w), generator=g).to(models.dtype)
    bank = models.reference_net(avatar.latent)
    latents = denoise(models, noise, bank, avatar.kps_feature, tokens[:n], length.windows, settings)
    return latents[0].float()


@torch.no_grad()
def compare_strategies(
    models: VExpressModels, info: AvatarInfo, engine: Engine, cfg: SessionConfig, seconds: float = 3.2
) -> dict[str, Any]:
    avatar = engine.avatar(info.id).encoded
    waveform = _speech16k(seconds)
    frames = int(seconds * 25)
    tokens = audio_tokens(models, waveform, frames, 2)
    offline_a = _offline(models, avatar, tokens, cfg.params.steps, 1, frames)
    offline_b = _offline(models, avatar, tokens, cfg.params.steps, 2, frames)
    n = offline_a.shape[1]
    norm = offline_a.norm()
    out: dict[str, Any] = {
        "frames": n,
        "offline_seed_to_seed_rel_l2": float((offline_b - offline_a).norm() / norm),
        "offline_boundary_ratio": _boundary_ratio(offline_a, 8),
    }
    silence = engine.silence_tokens_for(25)
    for strategy in ("chunked", "staggered"):
        settings = DenoiserSettings.of(cfg.with_params(new_frames=4, context_frames=4, strategy=strategy).params)
        denoiser = StreamDenoiser(models, settings)
        state = denoiser.new_state(avatar, 1, silence)
        made, call_s = [], []
        for i in range(0, n, 4):
            chunk = tokens[i : i + 4]
            payloads: list[int | None] = list(range(i, i + len(chunk)))
            if len(chunk) < 4:
                chunk = torch.cat([chunk, silence[None].expand(4 - len(chunk), -1, -1)])
                payloads += [None] * (4 - len(payloads))
            t0 = time.perf_counter()
            made += denoiser.run([ChunkJob(state, avatar, chunk, payloads)])[0]
            synchronize(models.device)
            call_s.append(time.perf_counter() - t0)
        while state.queue is not None and state.real_frames_queued:
            made += denoiser.run([ChunkJob(state, avatar, silence[None].expand(4, -1, -1), [None] * 4)])[0]
        latents = torch.stack([lat for _, lat in sorted(made, key=lambda x: x[0])], dim=1).float()
        depth = settings.steps if strategy == "staggered" else 1  # chunks of audio a frame waits for
        compute_ms = 1000 * float(np.median(call_s[1:] or call_s))
        out[strategy] = {
            "rel_l2_to_offline": float((latents - offline_a).norm() / norm),
            "boundary_ratio": _boundary_ratio(latents, 4),
            "frame_passes_per_frame": settings.passes_per_frame,
            "compute_ms_per_call": compute_ms,
            "latency_ms": 1000 * depth * 4 / 25 + 1000 * cfg.lookahead_s + compute_ms,
        }
    return out
