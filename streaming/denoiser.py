"""The sliding-window few-step denoiser: N new frames per call, temporal context from frames already made.

Two ways to slide a window of the 3-D UNet over an endless stream, both here so they can be measured side by side
(`vexpress-rt bench --strategies`; figures in docs/streaming.md):

* **chunked**: a window = C frames already produced (their clean latents, noised afresh to each step's
  level with fixed noise) + N new frames from pure noise; S DDIM steps update only the new frames, which leave
  clean. A frame costs S * (C + N) / N frame-passes and waits for its chunk's audio.
* **staggered** (stream batch, the default): a window = S groups of N frames at S different noise levels; each call
  advances every group one step, the cleanest group leaves and a new noise group enters. A frame costs S
  frame-passes but waits S - 1 further chunks of audio before it leaves.

Shapes are static (window size and batch fixed per `DenoiserSettings`, the shape-relevant part of a session's
`GenerationParams`) so CUDA graphs / torch.compile can apply. Sessions are batched: one UNet call serves the jobs
of several sessions with the same shape; the attention weights and the guidance scale are each job's own (one
value per row of the batch), and each session keeps its own noise generator, so a session's frames do not depend
on who it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vexpress_rt.loader import VExpressModels, make_scheduler

from .avatar import PreEncodedAvatar
from .controls import POSE, constant_rows
from .device import device_values, noise_generator
from .params import DEFAULTS, GenerationParams, window_frames
from .unet_runner import CaptureBackend, EagerUNet, GraphBank, GraphedUNet


@dataclass(frozen=True)
class DenoiserSettings:
    """The shape of a denoiser call: what keys the engine's denoisers, the UNet runner's graphs and the cost
    model. Made from validated `GenerationParams` (`of`), whose defaults are the only ones."""

    steps: int
    new_frames: int
    context_frames: int
    strategy: str
    cfg: bool  # guidance on: the batch doubles ([uncond, cond]); its scale is per row

    @classmethod
    def of(cls, params: GenerationParams) -> DenoiserSettings:
        return cls(params.steps, params.new_frames, params.context_frames, params.strategy, params.cfg)

    @property
    def window_frames(self) -> int:
        return window_frames(self.strategy, self.steps, self.new_frames, self.context_frames)

    @property
    def passes_per_call(self) -> int:
        """UNet frame-passes of one denoiser call (x2 with guidance): chunked runs the window once per step,
        staggered once in all."""
        calls = self.steps if self.strategy == "chunked" else 1
        return calls * self.window_frames * (2 if self.cfg else 1)

    @property
    def passes_per_frame(self) -> float:
        """UNet frame-passes per output frame (x2 with guidance)."""
        return self.passes_per_call / self.new_frames


class Schedule:
    """The few-step DDIM schedule (trailing spacing, v-prediction, zero terminal SNR) as tensors on `device`,
    made once: timesteps (long) and the alphas (float32, the precision the steps compute in)."""

    def __init__(self, steps: int, device: torch.device | str = "cpu"):
        scheduler = make_scheduler()
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.clone()  # descending, e.g. [999, 749, 499, 249]
        alphas = scheduler.alphas_cumprod
        alpha = alphas[timesteps].to(torch.float64)
        final = scheduler.final_alpha_cumprod.to(torch.float64)
        alpha_prev = torch.cat([alpha[1:], final.reshape(1)])
        self.timesteps = timesteps.to(device)
        self.alpha = alpha.to(device, torch.float32)
        self.alpha_prev = alpha_prev.to(device, torch.float32)


def ddim_step(x: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from a v prediction; alphas broadcast against x (per frame allowed)."""
    a, ap = alpha.to(torch.float32), alpha_prev.to(torch.float32)
    xf, vf = x.float(), v.float()
    x0 = a.sqrt() * xf - (1 - a).sqrt() * vf
    eps = a.sqrt() * vf + (1 - a).sqrt() * xf
    return (ap.sqrt() * x0 + (1 - ap).sqrt() * eps).to(x.dtype)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a = alpha.to(torch.float32)
    return (a.sqrt() * clean.float() + (1 - a).sqrt() * noise.float()).to(clean.dtype)


@dataclass
class StreamState:
    """One stream's denoiser memory: the last frames made (context) or the staggered queue, and its noise."""

    generator: torch.Generator
    context: torch.Tensor  # (4, C, h, w) clean latents of the frames most recently produced
    context_tokens: torch.Tensor  # (C, n, d) their audio tokens
    queue: torch.Tensor | None = None  # staggered: (4, (S-1)*N, h, w) latents at S-1 levels, oldest first
    queue_tokens: torch.Tensor | None = None
    queue_payloads: list[Any] = field(default_factory=list)  # one per queued frame; None = filler
    # The UNet's per-frame inputs (weights, pose features; frame first) of the context and queued frames; None:
    # those of the next job's first frame (a fresh stream, or one continuing from other frames).
    context_rows: dict[str, torch.Tensor] | None = None
    queue_rows: dict[str, torch.Tensor] | None = None

    @property
    def real_frames_queued(self) -> int:
        return sum(p is not None for p in self.queue_payloads)


@dataclass
class ChunkJob:
    state: StreamState
    avatar: PreEncodedAvatar
    tokens: torch.Tensor  # (N, n, d) audio tokens of the N new frames
    payloads: list[Any]  # one per new frame (None: filler, dropped on the way out)
    params: GenerationParams = DEFAULTS  # its session's: the guidance scale of its row (and its weights if no rows)
    meta: dict[str, float] = field(default_factory=dict)  # timings for the latency figures
    # The UNet's per-frame inputs of the N new frames (streaming/controls.py: weights, pose features); None:
    # `params`' weights and the avatar's fix_face pose on every frame.
    rows: dict[str, torch.Tensor] | None = None

    def new_rows(self, frames: int) -> dict[str, torch.Tensor]:
        return self.rows if self.rows is not None else constant_rows(self.params, self.avatar.kps_feature, frames)


class StreamDenoiser:
    def __init__(
        self, models: VExpressModels, settings: DenoiserSettings, graphs: CaptureBackend | GraphBank | None = None
    ):
        """`graphs`: replay the UNet windows from captured graphs (streaming/unet_runner.py: the engine's shared
        bank, or a backend with a bank of its own); None: eager."""
        self.models = models
        self.settings = settings
        self.device = models.device
        unet = models.denoising_unet
        self.unet = EagerUNet(unet) if graphs is None else GraphedUNet(unet, graphs)
        self.schedule = Schedule(settings.steps, self.device)
        if settings.strategy == "staggered":  # per-frame levels and timesteps of a full window, oldest group first
            self._levels_in = self._queue_alphas(0).reshape(1, 1, -1, 1, 1)
            self._levels_out = self._queue_alphas(1).reshape(1, 1, -1, 1, 1)
            self._frame_t = self.schedule.timesteps.flip(0).repeat_interleave(settings.new_frames)

    def forget(self, avatar: PreEncodedAvatar) -> None:
        """Let a deleted avatar's memory go: the UNet runner's cached batch references drop it."""
        self.unet.forget(avatar)

    # -- state --------------------------------------------------------------------------------------------
    def new_state(self, avatar: PreEncodedAvatar, seed: int, silence: torch.Tensor) -> StreamState:
        """A fresh stream. Its context is the portrait's own latent repeated (the pose to start from), with
        `silence` (n, d) tokens; a staggered queue starts as filler noise."""
        s = self.settings
        generator = noise_generator(self.device, seed)
        latent = avatar.latent[0].to(self.device, self.models.dtype)
        context = latent[:, None].repeat(1, s.context_frames, 1, 1)
        context_tokens = silence[None].repeat(s.context_frames, 1, 1)
        state = StreamState(generator, context, context_tokens)
        if s.strategy == "staggered":
            c, h, w = latent.shape
            held = s.window_frames - s.new_frames
            noise = self._draw(generator, (c, held, h, w))
            # Filler groups at their levels: the portrait latent noised to each group's timestep.
            levels = self._levels_in[0, :, :held]
            state.queue = add_noise(latent[:, None].expand_as(noise), noise, levels)
            state.queue_tokens = silence[None].repeat(held, 1, 1)
            state.queue_payloads = [None] * held
        return state

    def set_context(self, state: StreamState, latents: torch.Tensor, tokens: torch.Tensor) -> None:
        """Continue from other frames (e.g. the idle frames on screen when speech starts): (4, C, h, w)."""
        c = self.settings.context_frames
        state.context = latents[:, -c:].to(self.models.dtype) if c else latents[:, :0]
        state.context_tokens = tokens[-c:] if c else tokens[:0]
        state.context_rows = None  # the next job's first frame's

    # -- one call: N frames in, N frames out --------------------------------------------------------------
    @torch.no_grad()
    def run(self, jobs: list[ChunkJob]) -> list[list[tuple[Any, torch.Tensor]]]:
        """Advance each job's stream by one chunk in one batched UNet call per step. Returns, per job, the
        (payload, clean latent (4, h, w)) pairs of the frames that left the window (fillers dropped)."""
        if self.settings.strategy == "chunked":
            return self._run_chunked(jobs)
        return self._run_staggered(jobs)

    def _noise(self, state: StreamState, frames: int, like: torch.Tensor) -> torch.Tensor:
        c, _, h, w = like.shape
        return self._draw(state.generator, (c, frames, h, w))

    def _draw(self, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise drawn on the model's device, in float32 then cast (the CPU figures stay those of before)."""
        return torch.randn(shape, generator=generator, device=self.device).to(self.models.dtype)

    def _run_chunked(self, jobs: list[ChunkJob]) -> list[list[tuple[Any, torch.Tensor]]]:
        s, sched = self.settings, self.schedule
        n, c = s.new_frames, s.context_frames
        x = torch.stack([self._noise(j.state, n, j.state.context) for j in jobs])  # (B, 4, N, h, w)
        ctx_noise = torch.stack([self._noise(j.state, c, j.state.context) for j in jobs])
        context = torch.stack([j.state.context for j in jobs])
        tokens = torch.cat([torch.cat([j.state.context_tokens, j.tokens]) for j in jobs])
        rows = [_window_rows(j.state.context_rows, j.new_rows(n), c) for j in jobs]
        for k, t in enumerate(sched.timesteps):
            a, ap = sched.alpha[k], sched.alpha_prev[k]
            window = torch.cat([add_noise(context, ctx_noise, a), x], dim=2)
            v = self._unet(window, t, tokens, jobs, rows)
            x = ddim_step(x, v[:, :, c:], a, ap)
        results = []
        for b, job in enumerate(jobs):
            made = torch.cat([job.state.context, x[b]], dim=1)
            job.state.context = made[:, made.shape[1] - c :] if c else made[:, :0]
            job.state.context_tokens = torch.cat([job.state.context_tokens, job.tokens])[-c:] if c else job.tokens[:0]
            job.state.context_rows = {name: r[r.shape[0] - c :] for name, r in rows[b].items()}
            results.append([(p, x[b, :, f]) for f, p in enumerate(job.payloads) if p is not None])
        return results

    def _queue_alphas(self, shift: int) -> torch.Tensor:
        """Per-frame alpha of a full window, oldest group first; shift=0: the levels the call starts from,
        1: the levels it leaves them at. Group g (0 = oldest) sits at schedule index S-1-g."""
        s, sched = self.settings, self.schedule
        alphas = torch.cat([sched.alpha, sched.alpha_prev[-1:]])
        idx = torch.tensor([s.steps - 1 - g + shift for g in range(s.steps)], device=alphas.device)
        return alphas[idx].repeat_interleave(s.new_frames)

    def _run_staggered(self, jobs: list[ChunkJob]) -> list[list[tuple[Any, torch.Tensor]]]:
        """Between calls a stream holds S-1 groups; the call appends the new group (pure noise), steps every
        group once at its own timestep, and the oldest group leaves clean."""
        s = self.settings
        n = s.new_frames
        frame_t = self._frame_t.repeat(len(jobs))
        a, ap = self._levels_in, self._levels_out
        queues = [_queue(j.state) for j in jobs]
        x = torch.stack([torch.cat([q, self._noise(j.state, n, q)], dim=1) for j, (q, _) in zip(jobs, queues)])
        tokens = [torch.cat([q_tokens, j.tokens]) for j, (_, q_tokens) in zip(jobs, queues)]
        held = s.window_frames - n
        rows = [_window_rows(j.state.queue_rows, j.new_rows(n), held) for j in jobs]
        x = ddim_step(x, self._unet(x, frame_t, torch.cat(tokens), jobs, rows), a, ap)
        results = []
        for b, job in enumerate(jobs):
            state = job.state
            payloads = state.queue_payloads + list(job.payloads)
            results.append([(p, x[b, :, f]) for f, p in enumerate(payloads[:n]) if p is not None])
            if s.context_frames:
                state.context = torch.cat([state.context, x[b, :, :n]], dim=1)[:, -s.context_frames :]
            state.queue, state.queue_tokens, state.queue_payloads = x[b, :, n:], tokens[b][n:], payloads[n:]
            state.queue_rows = {name: r[n:] for name, r in rows[b].items()}
        return results

    def _unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        jobs: list[ChunkJob],
        rows: list[dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        """One UNet call over the batch of windows x (B, 4, T, h, w), each row with its job's per-frame inputs
        `rows` (T frames each: weights, pose); guidance doubles the batch and mixes each job's two rows with its
        own scale."""
        s, device, dtype = self.settings, self.models.device, self.models.dtype
        refs: list[PreEncodedAvatar | None] = [j.avatar for j in jobs]
        x, tokens, t = x.to(device, dtype), tokens.to(device, dtype), t.to(device)
        batch = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}  # (B, T, ...)
        batch[POSE] = batch[POSE].to(dtype).transpose(1, 2)  # (B, C0, T, h, w), frame-major: the UNet's view
        if s.cfg:  # [uncond, cond]: the unconditional branch drops reference, audio and pose together
            unconditional: list[PreEncodedAvatar | None] = [None] * len(jobs)
            refs = unconditional + refs
            tokens = torch.cat([torch.zeros_like(tokens), tokens])
            x = x.repeat(2, 1, 1, 1, 1)
            t = t.repeat(2) if t.ndim else t
            # the unconditional rows keep their job's weights
            batch = {name: torch.cat([torch.zeros_like(v) if name == POSE else v, v]) for name, v in batch.items()}
        if s.cfg:  # uploaded before the UNet call is launched: made after it, the host would wait for the call
            scale = device_values([j.params.guidance_scale for j in jobs], device)
        v = self.unet(x, t, tokens, refs, **batch)
        if s.cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + (scale.reshape(-1, 1, 1, 1, 1) * (v_cond - v_uncond).float()).to(v.dtype)
        return v


def _queue(state: StreamState) -> tuple[torch.Tensor, torch.Tensor]:
    """A staggered stream's queued latents and tokens (made with the stream: `new_state`)."""
    assert state.queue is not None and state.queue_tokens is not None, "not a staggered stream"
    return state.queue, state.queue_tokens


def _window_rows(
    held: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """A window's per-frame inputs: the `count` frames held (context or queue; None: the first new frame's,
    repeated) then the new frames'."""
    if held is None:
        held = {name: r[:1].expand(count, *r.shape[1:]) for name, r in new.items()}
    return {name: torch.cat([held[name], new[name]]) for name in new}
