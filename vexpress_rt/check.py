"""`vexpress-rt check-weights`: what is present, missing or wrong in a model folder, without loading it all."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import WeightsError
from .kps import insightface_pack_dir
from .loader import load_audio_encoder, load_tiny_vae, load_vae, read_unet_config
from .models import AudioProjection, DenoisingUNet, ReferenceNet, UNetConfig, VKpsGuider
from .weights import HOW_TO_GET, ModelPaths, compare_state, motion_module_keys, read_checkpoint


@dataclass
class CheckReport:
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (status, item, detail)
    model_dir: str = "."

    def add(self, status: str, item: str, detail: str = "") -> None:
        self.entries.append((status, item, detail))

    @property
    def ok(self) -> bool:
        return all(status in ("ok", "optional") for status, _, _ in self.entries)

    def lines(self) -> list[str]:
        out = [
            f"{status.upper():9s} {item}" + (f": {detail}" if detail else "") for status, item, detail in self.entries
        ]
        out.append(
            "All required model files are present and match." if self.ok else HOW_TO_GET.format(d=self.model_dir)
        )
        return out


def _shapes(module: torch.nn.Module, keys: set[str] | None = None) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if keys is None or k in keys}


def _check_file(report: CheckReport, label: str, path, expected: dict[str, tuple] | None, builder=None) -> None:
    try:
        state = read_checkpoint(path)
    except WeightsError as exc:
        report.add("missing" if not path.exists() else "wrong", label, str(exc))
        return
    if expected is None:  # widths come from the file itself
        try:
            expected = _shapes(builder(state))
        except (KeyError, ValueError) as exc:
            report.add("wrong", label, f"{path}: not the expected module ({exc})")
            return
    missing, unexpected, mismatched = compare_state(expected, {k: tuple(v.shape) for k, v in state.items()})
    if missing or unexpected or mismatched:
        detail = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys"
        first = (missing + unexpected + [m[0] for m in mismatched])[:3]
        report.add("wrong", label, f"{path}: {detail} (first: {', '.join(first)})")
    else:
        report.add("ok", label, f"{path} ({len(state)} tensors)")


def check_model_folder(paths: ModelPaths) -> CheckReport:
    report = CheckReport(model_dir=str(paths.denoising_unet_path.parent.parent))
    try:
        cfg = read_unet_config(paths.unet_config_path)
        report.add("ok", "unet config", str(paths.unet_config_path))
    except WeightsError as exc:
        cfg = UNetConfig()  # the released SD-1.5 layout
        report.add("missing" if not paths.unet_config_path.exists() else "wrong", "unet config", str(exc))
    with torch.device("meta"):
        unet, ref = DenoisingUNet(cfg), ReferenceNet(cfg)
    _check_file(report, "denoising_unet", paths.denoising_unet_path, _shapes(unet))
    _check_file(report, "motion_module", paths.motion_module_path, _shapes(unet, motion_module_keys(unet)))
    _check_file(report, "reference_net", paths.reference_net_path, _shapes(ref))
    _check_file(report, "v_kps_guider", paths.v_kps_guider_path, None, VKpsGuider.from_state_dict_shapes)
    _check_file(report, "audio_projection", paths.audio_projection_path, None, AudioProjection.from_state_dict_shapes)
    for label, loader, path in (
        ("vae", load_vae, paths.vae_path),
        ("wav2vec2", load_audio_encoder, paths.audio_encoder_path),
    ):
        try:
            loader(path)
            report.add("ok", label, str(path))
        except WeightsError as exc:
            report.add("missing" if not path.exists() else "wrong", label, str(exc))
    _check_taesd(report, paths.taesd_path)
    pack = insightface_pack_dir(paths.insightface_model_path)
    if pack.is_dir() and any(pack.glob("*.onnx")):
        report.add("ok", "insightface buffalo_l", str(pack))
    else:
        report.add("optional", "insightface buffalo_l", f"{pack} absent: pass --reference_kps_path to generate")
    return report


def _check_taesd(report: CheckReport, path) -> None:
    """Optional: without it the live server decodes with the full VAE; a broken folder is still an error."""
    if not path.exists():
        report.add("optional", "taesd", f"{path} absent: the live server decodes with the full VAE (slower)")
        return
    try:
        load_tiny_vae(path)
        report.add("ok", "taesd", str(path))
    except WeightsError as exc:
        report.add("wrong", "taesd", str(exc))
