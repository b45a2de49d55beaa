"""Real-size figures on a CUDA GPU with random weights (same speed as the released ones): `bench --gpu`.

Per dtype (fp16, bf16) and step count (1, 2, 4, 8): one engine call = the staggered window through the SD-1.5-size
3-D UNet (reference attention, audio attention, motion modules) + the VAE decode of the frames it finishes.
Prints fps (frames finished per second of compute), the call time, the audio-to-frame latency it implies, how many
25 fps sessions one device carries at batch 1 and 4, and peak memory. Without CUDA it returns {"skipped": ...}.
"""

from __future__ import annotations

import time

import torch

from vexpress_rt.models import DenoisingUNet, ReferenceNet, UNetConfig

from .denoiser import DenoiserSettings, Schedule
from .flops import SD_VAE_CONFIG

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _vae(dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD_VAE_CONFIG).to("cuda", dtype).eval()


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def gpu_figures(quick: bool = False, size: int = 512, new_frames: int = 2, lookahead_ms: float = 200.0) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    cfg = UNetConfig()  # the SD-1.5 layout V-Express uses
    h = w = size // 8
    out: dict = {"device": torch.cuda.get_device_name(), "size": size, "new_frames": new_frames, "runs": []}
    repeats = 5 if quick else 20
    for name, dtype in DTYPES.items():
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out["runs"] += _runs(cfg, name, dtype, h, w, new_frames, lookahead_ms, repeats)
    return out


def _runs(cfg: UNetConfig, name: str, dtype, h: int, w: int, new_frames: int, lookahead_ms: float, repeats: int):
    unet = DenoisingUNet(cfg).to("cuda", dtype).eval()
    reference_net = ReferenceNet(cfg).to("cuda", dtype).eval()
    kv = unet.reference_kv(reference_net(torch.randn(1, 4, h, w, device="cuda", dtype=dtype)))
    del reference_net
    vae = _vae(dtype)
    runs = []
    for steps in (1, 2, 4, 8):
        settings = DenoiserSettings(steps=steps, new_frames=new_frames, strategy="staggered")
        frames = settings.window_frames
        for batch in (1, 4):
            x = torch.randn(batch, 4, frames, h, w, device="cuda", dtype=dtype)
            tokens = torch.randn(batch * frames, 5, cfg.cross_attention_dim, device="cuda", dtype=dtype)
            kps = torch.randn(batch, cfg.block_out_channels[0], frames, h, w, device="cuda", dtype=dtype)
            t = Schedule(steps).timesteps.repeat_interleave(new_frames).repeat(batch).to("cuda")
            z = torch.randn(batch * new_frames, 4, h, w, device="cuda", dtype=dtype)

            def call(x=x, t=t, tokens=tokens, kps=kps, z=z):
                unet(x, t, tokens, kv, kps, 0.95, 3.0)
                vae.decode(z)

            seconds = _time(call, repeats)
            fps = batch * new_frames / seconds
            runs.append(
                {
                    "dtype": name,
                    "steps": steps,
                    "batch": batch,
                    "call_ms": 1000 * seconds,
                    "fps": fps,
                    "sessions_at_25fps": int(fps // 25),
                    # audio a frame waits for (its group + the pipeline depth) + lookahead + one call
                    "latency_ms": 1000 * steps * new_frames / 25 + lookahead_ms + 1000 * seconds,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
    return runs
