"""vexpress-rt: a real-time talking-head server on V-Express, and the original's offline commands.

This module holds the model's commands (generate: the original inference.py; extract-kps; check-weights;
download-weights); the layers above add theirs (serve, push, present, camera, bench, soak, make-demo-model), and
may add to `generate` what the original has not (`GenerateAddition`: the product's head motions, blinks and
presenter framing, streaming/generate_additions.py), so that this package imports nothing of theirs.

User errors (bad input, missing weights) print one message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import InputError, VExpressError
from .kps import RETARGET_STRATEGIES
from .params import AUDIO_ATTENTION_WEIGHT, MAX_WINDOW, REFERENCE_ATTENTION_WEIGHT, arg_type
from .weights import DEFAULT_MODEL_DIR, TAESD_REPO, ModelPaths

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger("vexpress_rt")
ORIGINAL_KPS_PATH = "./test_samples/emo/talk_emotion/kps.pth"  # the original's default (its sample folder)


@dataclass(frozen=True, eq=False)  # eq=False: arrays
class FramedReference:
    """The model's reference cut by a layer above from a whole photo (the reference image), and how each generated
    crop is framed back into that photo for the file written."""

    image: Image.Image  # the W x H crop the model is conditioned on
    kps: np.ndarray  # (3, 2) float32: its key points (eyes, nose), in its pixels
    size: tuple[int, int]  # (width, height) of the frames written
    alpha: bool  # the frames written are RGBA (H, W, 4): a transparent background
    compose: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (crop uint8 (h, w, 3), its key points) -> a frame


class GenerateAddition(Protocol):
    """What a layer above adds to `generate`: its flags, a reference cut from a whole photo with the frames framed
    back into it, key points that drive the head instead of --kps_path, and a last touch on the frames."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def framed_reference(self, args: argparse.Namespace, insightface_root: Path) -> FramedReference | None:
        """Called before any weights load (a bad combination of flags fails there, InputError). None: the reference
        image and key points as the original takes them, and the crops written as they are."""
        ...

    def driving_kps(
        self, args: argparse.Namespace, reference_kps: np.ndarray, frames: int, fps: float
    ) -> np.ndarray | None:
        """Absolute key points (frames, 3, 2), drawn as they are (no_retarget); None: --kps_path as usual."""
        ...

    def finish(self, args: argparse.Namespace, frames: np.ndarray, kps_sequence: np.ndarray, fps: float) -> np.ndarray:
        """The uint8 (T, H, W, 3) frames to write (`kps_sequence`: each frame's key points)."""
        ...


def _add_model_path_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", default=DEFAULT_MODEL_DIR, help="model folder in the released layout")
    # The original's per-file arguments; each defaults to its place under --model_dir.
    for name in (
        "unet_config_path",
        "vae_path",
        "audio_encoder_path",
        "insightface_model_path",
        "denoising_unet_path",
        "reference_net_path",
        "v_kps_guider_path",
        "audio_projection_path",
        "motion_module_path",
        "taesd_path",
    ):
        p.add_argument(f"--{name}", default=None, help="default: its place under --model_dir")


def _model_paths(args: argparse.Namespace) -> ModelPaths:
    overrides = {name: getattr(args, name) for name, _ in ModelPaths.from_model_dir(".").items()}
    return ModelPaths.from_model_dir(args.model_dir, **overrides)


def _add_generate(sub, additions: tuple[GenerateAddition, ...] = ()) -> None:
    p = sub.add_parser("generate", help="make a talking-head video from a portrait and audio (inference.py)")
    _add_model_path_args(p)
    p.add_argument("--retarget_strategy", default="fix_face", choices=RETARGET_STRATEGIES)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "fp32", "bf16"))
    p.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu when CUDA is unavailable)")
    p.add_argument("--gpu_id", type=int, default=0)
    p.add_argument("--do_multi_devices_inference", action="store_true", help="accepted; no effect (as originally)")
    p.add_argument("--save_gpu_memory", action="store_true", help="move modules off the GPU once used")
    p.add_argument("--num_pad_audio_frames", type=int, default=2)
    p.add_argument("--standard_audio_sampling_rate", type=int, default=16000)
    p.add_argument("--reference_image_path", default="./test_samples/emo/talk_emotion/ref.jpg")
    p.add_argument("--audio_path", default="./test_samples/emo/talk_emotion/aud.mp3")
    p.add_argument("--kps_path", default=ORIGINAL_KPS_PATH, help='driving key points (kps.pth); "" for none')
    p.add_argument("--output_path", default="./output/emo/talk_emotion.mp4")
    p.add_argument("--test_stage", default="stage_3", choices=("stage_1", "stage_2", "stage_3"))
    p.add_argument("--audio_embeddings_type", default="global", choices=("global",))
    p.add_argument("--image_width", type=int, default=512)
    p.add_argument("--image_height", type=int, default=512)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=3.5)
    p.add_argument("--context_frames", type=int, default=24)
    p.add_argument("--context_overlap", type=int, default=4)
    # The weights' defaults are the streaming sessions' too (GenerationParams); steps, guidance and seed keep the
    # original's (25, 3.5, 42) where the few-step streaming defaults differ.
    for name, default in (
        ("reference_attention_weight", REFERENCE_ATTENTION_WEIGHT),
        ("audio_attention_weight", AUDIO_ATTENTION_WEIGHT),
    ):
        p.add_argument(f"--{name}", type=arg_type(name), default=default)
    p.add_argument(
        "--reference_kps_path",
        default=None,
        help="JSON or .npy of 5x2 or 3x2 (x, y) points in the resized W x H frame; skips face detection",
    )
    p.add_argument(
        "--frames_out", default=None, help="also save the frames written, uint8 (T,H,W,3) (RGBA: (T,H,W,4)), as .npy"
    )
    for addition in additions:
        addition.add_arguments(p)
    p.set_defaults(func=cmd_generate, additions=additions)


def _resolve_device(name: str, gpu_id: int):
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            log.warning("CUDA is not available; running on the CPU (slow at real size)")
            return torch.device("cpu")
        return torch.device(name if ":" in name else f"cuda:{gpu_id}")
    return torch.device(name)


def _validate_generate(args: argparse.Namespace) -> None:
    if args.standard_audio_sampling_rate != 16000:
        raise InputError("--standard_audio_sampling_rate must be 16000: wav2vec2-base-960h reads 16 kHz audio")
    if args.image_width % 8 or args.image_height % 8:
        raise InputError("--image_width and --image_height must be multiples of 8")
    if not 1 <= args.context_frames <= MAX_WINDOW:
        raise InputError(f"--context_frames must be between 1 and {MAX_WINDOW} (the motion modules' position table)")
    if args.num_inference_steps < 1:
        raise InputError("--num_inference_steps must be at least 1")
    for flag in ("reference_image_path", "audio_path"):
        if not Path(getattr(args, flag)).is_file():
            raise InputError(f"--{flag}: file not found: {getattr(args, flag)}")


def _driving_kps(args: argparse.Namespace):
    from .kps import load_kps_sequence

    if not args.kps_path:
        return None
    if not Path(args.kps_path).is_file():
        if args.retarget_strategy == "fix_face":
            # The original asserts here even though fix_face ignores the file; we warn only about a path the user
            # gave (the default names the original's sample folder, which nobody is expected to have).
            if args.kps_path != ORIGINAL_KPS_PATH:
                log.warning("--kps_path %s not found; fix_face does not use it", args.kps_path)
            return None
        raise InputError(f"--kps_path: file not found: {args.kps_path}")
    return load_kps_sequence(args.kps_path)


def _reference_kps(args: argparse.Namespace, paths: ModelPaths, device):
    from .kps import FaceDetector, load_reference_kps

    if args.reference_kps_path:
        return load_reference_kps(args.reference_kps_path)
    detector = FaceDetector(paths.insightface_model_path, args.image_height, args.image_width, device.type, args.gpu_id)
    return detector.reference_kps_from_image(args.reference_image_path, args.image_width, args.image_height)


def _zero_stage_1(unet) -> None:
    """--test_stage stage_1: disable the motion modules and the audio attention, as the original does."""
    import torch

    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "temporal_transformer.proj_out" in name or "attn2.to_out" in name:
                param.zero_()


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from .loader import DTYPES, load_models
    from .media import load_audio, to_mono_16k, write_mp4, write_video
    from .pipeline import GenerationSettings, generate, load_reference_image, reference_tensor, video_length_for

    started = time.time()
    _validate_generate(args)
    if args.do_multi_devices_inference:
        log.warning("--do_multi_devices_inference has no effect on the pipeline (as in the original)")
    device = _resolve_device(args.device, args.gpu_id)
    paths = _model_paths(args)
    framed: FramedReference | None = None  # the output framed in the whole photo (a layer above's flags)
    for addition in args.additions:
        framed = addition.framed_reference(args, Path(paths.insightface_model_path)) or framed
    models = load_models(paths, device=device, dtype=DTYPES[args.dtype])
    expected_window = models.audio_projection.pos_emb.num_embeddings
    if 2 * (2 * args.num_pad_audio_frames + 1) != expected_window:
        raise InputError(
            f"--num_pad_audio_frames {args.num_pad_audio_frames} does not fit the audio projection, which reads "
            f"windows of {expected_window} tokens (num_pad_audio_frames=2 for the released weights)"
        )
    if args.test_stage == "stage_1":
        _zero_stage_1(models.denoising_unet)

    if framed is None:
        reference_kps = _reference_kps(args, paths, device)
        image = load_reference_image(args.reference_image_path, args.image_width, args.image_height)
    else:
        reference_kps = framed.kps
        image = reference_tensor(framed.image, args.image_width, args.image_height)
    audio = load_audio(args.audio_path)
    waveform = to_mono_16k(audio)
    settings = GenerationSettings(
        width=args.image_width,
        height=args.image_height,
        fps=args.fps,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        context_frames=args.context_frames,
        context_overlap=args.context_overlap,
        reference_attention_weight=args.reference_attention_weight,
        audio_attention_weight=args.audio_attention_weight,
        num_pad_audio_frames=args.num_pad_audio_frames,
    )
    # Too-short audio is refused before the progress bar starts, so the error is not glued onto the bar.
    length = video_length_for(len(waveform), args.fps, args.context_frames, args.context_overlap)
    retarget_strategy, driving_kps = args.retarget_strategy, None
    for addition in args.additions:  # absolute key points for every frame (a built-in motion), drawn as they are
        drawn = addition.driving_kps(args, reference_kps, length.frames, args.fps)
        if drawn is not None:
            retarget_strategy, driving_kps = "no_retarget", drawn
    if driving_kps is None:
        driving_kps = _driving_kps(args)
    with tqdm(total=args.num_inference_steps, desc="Denoising", unit="step") as progress:
        result = generate(
            models,
            settings,
            image,
            reference_kps,
            waveform,
            retarget_strategy,
            driving_kps,
            on_step=lambda step, latents: progress.update(1),
            save_gpu_memory=args.save_gpu_memory,
        )
    frames = result.frames
    for addition in args.additions:
        frames = addition.finish(args, frames, result.kps_sequence, float(result.fps))
    if framed is None:
        write_mp4(args.output_path, frames, result.fps, audio)
        if args.frames_out:
            Path(args.frames_out).parent.mkdir(parents=True, exist_ok=True)
            np.save(args.frames_out, frames)
    else:
        keep = None
        if args.frames_out:  # written frame by frame: framed outputs are large
            Path(args.frames_out).parent.mkdir(parents=True, exist_ok=True)
            width, height = framed.size
            shape = (len(frames), height, width, 4 if framed.alpha else 3)
            keep = np.lib.format.open_memmap(args.frames_out, mode="w+", dtype=np.uint8, shape=shape)
        timer, writing = _Timer(), time.perf_counter()
        composed = _framed_frames(framed, frames, result.kps_sequence, keep, timer)
        write_video(args.output_path, composed, len(frames), framed.size, result.fps, audio, framed.alpha)
        if keep is not None:
            keep.flush()
        encoding = (time.perf_counter() - writing - timer.total) / len(frames)  # the rest of the writing
        print(
            f"Framed {framed.size[0]}x{framed.size[1]}: {1000 * timer.mean():.1f} ms per frame to compose, "
            f"{1000 * encoding:.1f} ms to encode"
        )
    elapsed = time.time() - started
    print(
        f"Saved {args.output_path}: {len(frames)} frames at {float(result.fps):.3f} fps "
        f"in {elapsed:.1f} s ({len(frames) / elapsed:.2f} frames/s)"
    )
    if device.type == "cuda":
        print(f"Peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    return 0


class _Timer:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, seconds: float) -> None:
        self.total, self.count = self.total + seconds, self.count + 1

    def mean(self) -> float:
        return self.total / max(1, self.count)


def _framed_frames(
    framed: FramedReference, crops: np.ndarray, kps_sequence: np.ndarray, keep: np.ndarray | None, timer: _Timer
) -> Iterator[np.ndarray]:
    """The frames written, composed one at a time (and kept in `keep`, a file-backed array, where asked)."""
    for i, (crop, kps) in enumerate(zip(crops, kps_sequence, strict=True)):
        start = time.perf_counter()
        frame = framed.compose(crop, kps)
        timer.add(time.perf_counter() - start)
        if keep is not None:
            keep[i] = frame
        yield frame


def _add_extract_kps(sub) -> None:
    p = sub.add_parser("extract-kps", help="key-point sequence and audio from a video (kps.pth format)")
    p.add_argument("--video_path", required=True)
    p.add_argument("--kps_sequence_save_path", required=True)
    p.add_argument("--audio_save_path", default="", help='"" to skip the audio')
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpu_id", type=int, default=0)
    p.add_argument("--model_dir", default=DEFAULT_MODEL_DIR)
    p.add_argument("--insightface_model_path", default=None, help="default: <model_dir>/insightface_models")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.set_defaults(func=cmd_extract_kps)


def cmd_extract_kps(args: argparse.Namespace) -> int:
    from .kps import extract_kps_sequence_and_audio

    if not Path(args.video_path).is_file():
        raise InputError(f"--video_path: file not found: {args.video_path}")
    root = args.insightface_model_path or Path(args.model_dir) / "insightface_models"
    device = _resolve_device(args.device, args.gpu_id)
    seq = extract_kps_sequence_and_audio(
        args.video_path,
        args.kps_sequence_save_path,
        args.audio_save_path or None,
        root,
        args.width,
        args.height,
        device.type,
    )
    print(f"Saved {len(seq)} key-point frames to {args.kps_sequence_save_path}")
    return 0


def _add_check_weights(sub) -> None:
    p = sub.add_parser("check-weights", help="report which model files are present, missing or wrong")
    _add_model_path_args(p)
    p.set_defaults(func=cmd_check_weights)


def cmd_check_weights(args: argparse.Namespace) -> int:
    from .check import check_model_folder

    report = check_model_folder(_model_paths(args))
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def _add_download_weights(sub) -> None:
    p = sub.add_parser(
        "download-weights",
        help="fetch the released weights (tk93/V-Express, ~8 GB) and the TAESD live decoder from the HuggingFace hub",
    )
    p.add_argument("--model_dir", default=DEFAULT_MODEL_DIR)
    p.add_argument("--repo_id", default="tk93/V-Express")
    p.add_argument("--revision", default=None)
    p.add_argument(
        "--taesd_repo_id", default=TAESD_REPO, help='the live decoder (into <model_dir>/taesd); "" to skip it'
    )
    p.set_defaults(func=cmd_download_weights)


def cmd_download_weights(args: argparse.Namespace) -> int:
    from .weights import download_weights

    target = download_weights(args.model_dir, args.repo_id, args.revision, args.taesd_repo_id)
    print(f"Weights are in {target}; check them with: vexpress-rt check-weights --model_dir {target}")
    return 0


def build_parser(
    extra_commands: Iterable[Callable] = (), generate_additions: Iterable[GenerateAddition] = ()
) -> argparse.ArgumentParser:
    """The model's commands; `extra_commands` (functions of the subparsers) add those of the layers above it
    (`server.cli` adds `serve` and `bench`) and `generate_additions` their flags of `generate`, so that this
    package imports nothing of theirs."""
    parser = argparse.ArgumentParser(
        prog="vexpress-rt",
        description=__doc__.splitlines()[0],
        epilog="No weights yet? `vexpress-rt make-demo-model` writes a tiny random model: every command on a CPU.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub, tuple(generate_additions))
    _add_extract_kps(sub)
    _add_check_weights(sub)
    _add_download_weights(sub)
    for add_command in extra_commands:
        add_command(sub)
    return parser


def main(
    argv: list[str] | None = None,
    extra_commands: Iterable[Callable] = (),
    generate_additions: Iterable[GenerateAddition] = (),
) -> int:
    args = build_parser(extra_commands, generate_additions).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except VExpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
