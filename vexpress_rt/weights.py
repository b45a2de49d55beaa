"""The model folder in the released layout, strict checkpoint loading, and the optional hub download.

```
<model_dir>/v-express/{denoising_unet,reference_net,v_kps_guider,audio_projection,motion_module}.bin
<model_dir>/stable-diffusion-v1-5/unet/config.json
<model_dir>/sd-vae-ft-mse/                 diffusers AutoencoderKL folder
<model_dir>/wav2vec2-base-960h/            transformers Wav2Vec2 folder (+ preprocessor_config.json)
<model_dir>/insightface_models/models/buffalo_l/   only for face detection
<model_dir>/taesd/                         diffusers AutoencoderTiny folder: the live server's fast decoder (optional)
```
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError

HUB_REPO = "tk93/V-Express"
TAESD_REPO = "madebyollin/taesd"  # TAESD for SD-1.x latents, in the diffusers layout
TAESD_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
DEFAULT_MODEL_DIR = "./model_ckpts"
VEXPRESS_FILES = ("denoising_unet", "reference_net", "v_kps_guider", "audio_projection", "motion_module")
MOTION_MODULE_MARKER = "motion_module"
HOW_TO_GET = (
    "Get the released weights with `vexpress-rt download-weights --model_dir {d}` "
    f"(HuggingFace `{HUB_REPO}`, folder model_ckpts/), or copy them there by hand."
)


@dataclass
class ModelPaths:
    """Every file the model needs; defaults follow the released layout under one folder."""

    unet_config_path: Path
    vae_path: Path
    audio_encoder_path: Path
    insightface_model_path: Path
    denoising_unet_path: Path
    reference_net_path: Path
    v_kps_guider_path: Path
    audio_projection_path: Path
    motion_module_path: Path
    taesd_path: Path

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **overrides: str | Path | None) -> ModelPaths:
        d = Path(model_dir)
        paths = cls(
            unet_config_path=d / "stable-diffusion-v1-5" / "unet" / "config.json",
            vae_path=d / "sd-vae-ft-mse",
            audio_encoder_path=d / "wav2vec2-base-960h",
            insightface_model_path=d / "insightface_models",
            denoising_unet_path=d / "v-express" / "denoising_unet.bin",
            reference_net_path=d / "v-express" / "reference_net.bin",
            v_kps_guider_path=d / "v-express" / "v_kps_guider.bin",
            audio_projection_path=d / "v-express" / "audio_projection.bin",
            motion_module_path=d / "v-express" / "motion_module.bin",
            taesd_path=d / "taesd",
        )
        for key, value in overrides.items():
            if value:
                setattr(paths, key, Path(value))
        return paths

    def items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A released `.bin`: a plain tensor dict (fp16), saved from CUDA; loads with weights_only=True."""
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated download, a pickle with code in it...
        raise WeightsError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a tensor state dict")
    return state


def compare_state(expected: dict[str, tuple], found: dict[str, tuple]) -> tuple[list, list, list]:
    """Keys missing from `found`, unexpected in it, and present with another shape ((key, want, got))."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, expected[k], found[k]) for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    return missing, unexpected, mismatched


def _describe(path: Path, missing, unexpected, mismatched, limit: int = 5) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:limit])})")
    if mismatched:
        shown = ", ".join(f"{k} expected {list(a)} got {list(b)}" for k, a, b in mismatched[:limit])
        parts.append(f"{len(mismatched)} with the wrong shape (first: {shown})")
    return f"{path} does not match the model: " + "; ".join(parts)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, keys: set[str] | None = None) -> None:
    """Copy `state` into `module`; every key of the module (or of `keys`, for a partial file) must be there
    with its exact shape, and nothing else may be. Values are cast to the module's dtype."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    expected = own if keys is None else {k: own[k] for k in keys}
    missing, unexpected, mismatched = compare_state(expected, {k: tuple(v.shape) for k, v in state.items()})
    if missing or unexpected or mismatched:
        raise WeightsError(_describe(path, missing, unexpected, mismatched))
    module.load_state_dict(state, strict=keys is None)


def motion_module_keys(module: nn.Module) -> set[str]:
    return {k for k in module.state_dict() if MOTION_MODULE_MARKER in k}


@dataclass(frozen=True)
class HubFetch:
    """One hub snapshot to fetch: the files matching `patterns` from `repo_id`. Either the items of its folder
    `source` land in the model folder, or (with `dest`) the listed files land in the model folder's `dest`."""

    repo_id: str
    revision: str | None
    patterns: tuple[str, ...]
    source: str = ""
    dest: str = ""


def download_plan(repo_id: str = HUB_REPO, revision: str | None = None, taesd_repo: str | None = TAESD_REPO):
    """What `download-weights` fetches: the released folder, then (unless `taesd_repo` is empty) TAESD."""
    plan = [HubFetch(repo_id, revision, ("model_ckpts/**",), source="model_ckpts")]
    if taesd_repo:
        plan.append(HubFetch(taesd_repo, None, TAESD_FILES, dest="taesd"))
    return plan


def _snapshot(fetch: HubFetch, local_dir: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot_download(
            repo_id=fetch.repo_id, revision=fetch.revision, local_dir=local_dir, allow_patterns=list(fetch.patterns)
        )
    except LocalEntryNotFoundError as exc:  # offline (HF_HUB_OFFLINE=1) or the hub unreachable
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else "no network?"
        raise WeightsError(
            f"cannot reach the HuggingFace hub for {fetch.repo_id} ({why}): run download-weights where the hub is "
            "reachable and copy the model folder here; to try the commands without the weights: "
            "vexpress-rt make-demo-model"
        ) from exc
    except HfHubHTTPError as exc:  # reachable, but refused (no such repo or revision, rate limit, gated)
        raise WeightsError(f"the HuggingFace hub refused {fetch.repo_id}: {str(exc).splitlines()[0]}") from exc


def download_weights(
    model_dir: str | Path,
    repo_id: str = HUB_REPO,
    revision: str | None = None,
    taesd_repo: str | None = TAESD_REPO,
    snapshot=_snapshot,
) -> Path:
    """Fetch the released model folder (several GB) and TAESD from the hub into `model_dir` (needs network).
    `snapshot(fetch, local_dir)` downloads one plan item; tests pass a local fake."""
    target = Path(model_dir)
    staging = target / ".download"
    for fetch in download_plan(repo_id, revision, taesd_repo):
        shutil.rmtree(staging, ignore_errors=True)
        snapshot(fetch, staging)
        if fetch.dest:  # a fixed list of files, into a folder of its own
            missing = [name for name in fetch.patterns if not (staging / name).is_file()]
            if missing:
                raise WeightsError(f"{fetch.repo_id} has no {', '.join(missing)} at this revision")
            dest = target / fetch.dest
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for name in fetch.patterns:
                shutil.move(str(staging / name), dest / name)
            continue
        source = staging / fetch.source
        if not source.is_dir():
            raise WeightsError(f"{fetch.repo_id} has no {fetch.source}/ folder at this revision")
        for item in source.iterdir():
            dest = target / item.name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            shutil.move(str(item), dest)
    shutil.rmtree(staging, ignore_errors=True)
    return target
