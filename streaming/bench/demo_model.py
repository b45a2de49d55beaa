"""`vexpress-rt make-demo-model`: a tiny V-Express with random weights, written in the released folder layout.

It passes `check-weights` and loads strictly like the released weights, so every command (`serve`, `generate`,
`present`, `bench --model_dir`) runs with it on a laptop's CPU without the 8 GB download; its avatar moves and
speaks noise, not a face. Beside the model it writes `samples/`: a portrait, its key points in the demo frame, and
a few seconds of a voiced signal, so the README's tour has inputs to hand.

The sizes are the golden fixture set's (`TINY_UNET`, `TINY_VAE`, `TINY_WAV2VEC2`); the tests build their model
with the same writer (`tests/kit/tiny_model.py`). Values are seeded and drawn at a trained-like scale (weights
~ N(0, 1/fan_in), norm gains 1 + N(0, 0.1), biases N(0, 0.05)), so every conditioning path changes the output;
`motion_module.bin` carries values that differ from those inside `denoising_unet.bin`, as the fixtures' do.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vexpress_rt.models import AudioProjection, DenoisingUNet, ReferenceNet, UNetConfig, VKpsGuider

from ..portrait import DEFAULT_PORTRAIT
from .random_models import TINY_UNET, TINY_VAE, TINY_WAV2VEC2
from .speech import RATE, speech

SEED = 1234
DEMO_WIDTH, DEMO_HEIGHT = 128, 64  # the frame size the demo's commands use (`--width 128 --height 64`)
SAMPLE_SECONDS = 2.0

# The tiny UNet written as the released folder's diffusers config.
UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": TINY_UNET.attention_heads,
    "block_out_channels": list(TINY_UNET.block_out_channels),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": TINY_UNET.norm_num_groups,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}

# The released checkpoint's wav2vec2 processor settings.
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_normalize": True,
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": RATE,
}


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter with seeded values of a trained-like scale (buffers are left as built)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            elif p.ndim == 1:  # normalisation gains
                p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.1)
            else:
                fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


def _fp16_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def _write_vexpress(root: Path, generator: torch.Generator) -> None:
    cfg_path = root / "stable-diffusion-v1-5" / "unet" / "config.json"
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_text(json.dumps(UNET_CONFIG, indent=2))
    cfg = UNetConfig.from_dict(UNET_CONFIG)
    unet = DenoisingUNet(cfg)
    modules: dict[str, torch.nn.Module] = {
        "denoising_unet": unet,
        "reference_net": ReferenceNet(cfg),
        "v_kps_guider": VKpsGuider(embedding_channels=cfg.block_out_channels[0]),
        "audio_projection": AudioProjection(dim=16, depth=4, dim_head=64, heads=12, embedding_dim=32, output_dim=768),
    }
    out = root / "v-express"
    out.mkdir()
    for name, module in modules.items():
        randomise(module, generator)
        torch.save(_fp16_state(module), out / f"{name}.bin")
    # motion_module.bin: the motion-module keys with other values (the sinusoidal PE buffers stay the same table).
    randomise(unet, generator)
    torch.save({k: v for k, v in _fp16_state(unet).items() if "motion_module" in k}, out / "motion_module.bin")


def _write_vae(root: Path, generator: torch.Generator) -> None:
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(**TINY_VAE)  # diffusers ships no type information
    randomise(vae, generator)
    vae.save_pretrained(root / "sd-vae-ft-mse")


def _write_wav2vec2(root: Path, generator: torch.Generator) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    folder = root / "wav2vec2-base-960h"
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**TINY_WAV2VEC2, architectures=["Wav2Vec2ForCTC"]))
    randomise(model, generator)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))


def write_model_folder(root: Path, seed: int = SEED) -> Path:
    """Write the tiny random model at `root` (which must not exist yet) in the released layout."""
    root.mkdir(parents=True)
    torch.manual_seed(seed)  # module constructors draw from the global generator; make the build repeatable
    generator = torch.Generator().manual_seed(seed)
    _write_vexpress(root, generator)
    _write_vae(root, generator)
    _write_wav2vec2(root, generator)
    return root


def write_samples(folder: Path, width: int = DEMO_WIDTH, height: int = DEMO_HEIGHT) -> Path:
    """`portrait.png` (the packaged portrait), `portrait_kps.json` (its key points in the `width` x `height` frame
    that `generate --image_width/--image_height` resizes it to) and `speech.wav` (16 kHz mono PCM16)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(DEFAULT_PORTRAIT)
    image.save(folder / "portrait.png")
    kps = np.array(json.loads(DEFAULT_PORTRAIT.with_suffix(".json").read_text())["kps"], dtype=np.float64)
    scaled = kps * np.array([width / image.width, height / image.height])
    (folder / "portrait_kps.json").write_text(json.dumps({"kps": np.round(scaled, 2).tolist()}))
    with wave.open(str(folder / "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(speech(SAMPLE_SECONDS).tobytes())
    return folder


def add_make_demo_model_command(sub: Any) -> None:  # argparse's sub-parsers action (a private type)
    p = sub.add_parser(
        "make-demo-model",
        help="write a tiny random model folder (the released layout) to try every command on a CPU",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--model_dir", default="./demo_model", help="the folder to write (must not exist); ./demo_model")
    p.add_argument("--seed", type=int, default=SEED)
    p.set_defaults(func=cmd_make_demo_model)


def cmd_make_demo_model(args: argparse.Namespace) -> int:
    root = Path(args.model_dir)
    if root.exists():
        print(f"error: {root} exists already: give --model_dir a new folder", file=sys.stderr)
        return 2
    write_model_folder(root, args.seed)
    samples = write_samples(root / "samples")
    print(f"Wrote a tiny random model to {root} (random weights: the avatar speaks noise, not a face).")
    print(f"Samples: {samples}/portrait.png, portrait_kps.json ({DEMO_WIDTH}x{DEMO_HEIGHT}), speech.wav")
    print(
        f"Try: vexpress-rt serve --model_dir {root} --device cpu --width {DEMO_WIDTH} --height {DEMO_HEIGHT} "
        "--no-admission"
    )
    return 0
