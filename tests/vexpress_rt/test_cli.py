"""`python -m vexpress_rt generate / extract-kps` as a user runs them: real processes, offline, on the CPU.

The runs are independent processes, so all of them are started together on a small thread pool (about one run
per CPU core) and every test waits only for its own run. Generations use the tiny golden fixtures at
128x64 with 1-2 denoising steps; what is checked is what a user sees: the exit code, the files written, the
messages printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from kit.paths import REPO_ROOT

from streaming.motion import motion_sequence
from streaming.params import DEFAULTS, field_error
from vexpress_rt.cli import build_parser
from vexpress_rt.kps import load_reference_kps
from vexpress_rt.media import resample_pcm

CPUS = os.cpu_count() or 1
WORKERS = min(4, CPUS)
THREADS_PER_RUN = max(1, CPUS // WORKERS)
RUN_TIMEOUT_S = 400

# The fixtures' generation settings (README section 3), at fp32 on the CPU.
SMALL = [
    "--image_width", "128", "--image_height", "64",
    "--context_frames", "12", "--context_overlap", "4",
    "--dtype", "fp32", "--device", "cpu",
]  # fmt: skip
FRAMES, HEIGHT, WIDTH = 36, 64, 128
FIXTURE_SECONDS = 20800 / 16000
MP3_SECONDS = 1.45


def _run_cli(args: list[str], cwd: Path, module: str = "vexpress_rt") -> subprocess.CompletedProcess:
    """`python -m vexpress_rt ...`: the model port's own command; `module="server"` is `vexpress-rt`, which adds
    the product's flags to `generate` (streaming/generate_additions.py)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONIOENCODING="utf-8",
        OMP_NUM_THREADS=str(THREADS_PER_RUN),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        cwd=cwd,
        timeout=RUN_TIMEOUT_S,
    )


class Runs:
    """Named CLI runs started together; `runs[name]` waits for that one."""

    def __init__(self, commands: dict[str, list[str]], cwd: Path):
        self._pool = ThreadPoolExecutor(max_workers=WORKERS)
        self._futures = {
            name: self._pool.submit(_run_cli, args, cwd, "server" if name in PRODUCT_RUNS else "vexpress_rt")
            for name, args in commands.items()
        }

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        return self._futures[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0, w.getframerate()


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes())


def _write_mp3(path: Path, samples: np.ndarray, rate: int) -> None:
    """float32 (2, n) -> stereo MP3 (libmp3lame) with PyAV."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.layout = "stereo"
        for start in range(0, samples.shape[1], 4096):
            chunk = np.ascontiguousarray(samples[:, start : start + 4096])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate = rate
            frame.pts = None
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _decoded_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate


@pytest.fixture(scope="module")
def inputs(model_dir, inputs_dir, tmp_path_factory) -> dict[str, Path]:
    """The fixture inputs, plus inputs made here: an MP3, a too-short WAV, a broken PNG, a bad kps file."""
    root = tmp_path_factory.mktemp("cli_inputs")
    src = inputs_dir
    mono, rate = _read_wav(src / "audio.wav")
    assert rate == 16000
    # 1.45 s instead of 1.3 s, so the video's rate visibly follows this file's duration: 36 frames at 36 / 1.45 fps.
    longer = np.concatenate([mono, mono[: int(MP3_SECONDS * rate) - len(mono)] * 0.5])
    stereo = np.stack([longer * 0.9, longer * 0.6])  # channels differ, so the down-mix matters
    _write_mp3(root / "audio_44k_stereo.mp3", resample_pcm(stereo, rate, 44100), 44100)
    _write_wav(root / "short.wav", mono[: int(0.3 * rate)], rate)
    (root / "broken.png").write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    np.save(root / "bad_reference_kps.npy", np.zeros((4, 3), dtype=np.float32))
    (root / "empty_model_dir").mkdir()
    return {
        "model_dir": model_dir,
        "reference": src / "reference.png",
        "wav": src / "audio.wav",
        "kps": src / "kps.pth",
        "reference_kps": src / "reference_kps.npy",
        "video": src / "video.mp4",
        "mp3": root / "audio_44k_stereo.mp3",
        "short_wav": root / "short.wav",
        "broken_png": root / "broken.png",
        "bad_reference_kps": root / "bad_reference_kps.npy",
        "empty_model_dir": root / "empty_model_dir",
        "missing": root / "does_not_exist",
    }


def _generate_args(inputs: dict[str, Path], out: Path, name: str, **overrides: str | None) -> list[str]:
    """`generate` on the fixtures, writing <out>/<name>.mp4 and .npy; overrides: {flag: value}."""
    flags = {
        "model_dir": inputs["model_dir"],
        "reference_image_path": inputs["reference"],
        "audio_path": inputs["wav"],
        "kps_path": inputs["kps"],
        "reference_kps_path": inputs["reference_kps"],
        "output_path": out / f"{name}.mp4",
        "frames_out": out / f"{name}.npy",
        "num_inference_steps": "1",
    }
    flags.update(overrides)
    args = ["generate", *SMALL]
    for flag, value in flags.items():
        if value is not None:  # None: the flag left at its default
            args += [f"--{flag}", str(value)]
    return args


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_outputs")


PRODUCT_RUNS = {"motion"}  # runs with the product's flags of `generate` (`vexpress-rt`, not the model port's)


def _generation_commands(inputs: dict[str, Path], outputs: Path) -> dict[str, list[str]]:
    # `--motion nod` must drive the video with exactly motion_sequence's points: the same points as a kps file
    # (no_retarget draws them as they are) make the same video. 30 fps and seed 42: generate's defaults.
    nod = motion_sequence("nod", load_reference_kps(inputs["reference_kps"]), FRAMES, 30.0, amplitude=3.0, seed=42)
    np.save(outputs / "nod_kps.npy", nod)
    return {
        "motion": _generate_args(inputs, outputs, "motion", motion="nod", motion_amplitude="3"),
        "motion_as_kps": _generate_args(
            inputs, outputs, "motion_as_kps", retarget_strategy="no_retarget", kps_path=outputs / "nod_kps.npy"
        ),
        # --kps_path left at the original's default (its sample folder): fix_face does not read it
        "fix_face": _generate_args(inputs, outputs, "fix_face", num_inference_steps="2", kps_path=None),
        "mp3": _generate_args(inputs, outputs, "mp3", audio_path=inputs["mp3"]),
        "no_retarget": _generate_args(inputs, outputs, "no_retarget", retarget_strategy="no_retarget"),
        "offset_retarget": _generate_args(inputs, outputs, "offset_retarget", retarget_strategy="offset_retarget"),
        "naive_retarget": _generate_args(inputs, outputs, "naive_retarget", retarget_strategy="naive_retarget"),
        "stage_1": _generate_args(
            inputs, outputs, "stage_1", retarget_strategy="no_retarget", test_stage="stage_1"
        ),  # same as no_retarget (stage_3) but for the stage
    }


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def _probe_mp4(path: Path) -> dict:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        info = {
            "video_codec": video.codec_context.name,
            "size": (video.width, video.height),
            "fps": Fraction(video.average_rate),
            "audio_codec": audio.codec_context.name,
            "audio_rate": audio.codec_context.sample_rate,
            "audio_channels": audio.codec_context.layout.nb_channels,
        }
        info["frames"] = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video)])
    info["audio_seconds"] = _decoded_seconds(path)
    return info


def _frames(outputs: Path, name: str) -> np.ndarray:
    frames = np.load(outputs / f"{name}.npy")
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    return frames


# ---------------------------------------------------------------------------------------------------------
# Arguments: every inference.py argument, with the original's defaults


ORIGINAL_ARGS = (
    "unet_config_path vae_path audio_encoder_path insightface_model_path denoising_unet_path reference_net_path "
    "v_kps_guider_path audio_projection_path motion_module_path retarget_strategy dtype device gpu_id "
    "do_multi_devices_inference save_gpu_memory num_pad_audio_frames standard_audio_sampling_rate "
    "reference_image_path audio_path kps_path output_path test_stage audio_embeddings_type image_width "
    "image_height fps seed num_inference_steps guidance_scale context_frames context_overlap "
    "reference_attention_weight audio_attention_weight"
).split()
EXTRA_ARGS = ("model_dir", "reference_kps_path", "frames_out")


def test_generate_help_lists_every_original_argument(tmp_path):
    result = _ok(_run_cli(["generate", "--help"], tmp_path))
    for name in (*ORIGINAL_ARGS, *EXTRA_ARGS):
        assert f"--{name}" in result.stdout, name


def test_generate_defaults_match_the_original():
    args = build_parser().parse_args(["generate"])
    assert args.retarget_strategy == "fix_face"
    assert args.dtype == "fp16"
    assert args.device == "cuda" and args.gpu_id == 0
    assert args.num_inference_steps == 25
    assert args.guidance_scale == 3.5
    assert args.context_frames == 24 and args.context_overlap == 4
    assert args.fps == 30.0
    assert args.seed == 42
    assert (args.image_width, args.image_height) == (512, 512)
    assert args.reference_attention_weight == 0.95 and args.audio_attention_weight == 3.0
    assert args.num_pad_audio_frames == 2
    assert args.standard_audio_sampling_rate == 16000
    assert args.test_stage == "stage_3" and args.audio_embeddings_type == "global"
    assert args.do_multi_devices_inference is False and args.save_gpu_memory is False
    assert args.reference_image_path == "./test_samples/emo/talk_emotion/ref.jpg"
    assert args.audio_path == "./test_samples/emo/talk_emotion/aud.mp3"
    assert args.kps_path == "./test_samples/emo/talk_emotion/kps.pth"
    assert args.output_path == "./output/emo/talk_emotion.mp4"
    # the weights' defaults are the streaming sessions' (one GenerationParams); steps, guidance, seed the original's
    assert args.audio_attention_weight == DEFAULTS.audio_attention_weight
    assert args.reference_attention_weight == DEFAULTS.reference_attention_weight


@pytest.mark.parametrize(
    "module, args, field, value",
    [
        ("server", ["serve", "--steps", "9"], "steps", 9),
        ("server", ["serve", "--steps", "two"], "steps", "two"),
        ("vexpress_rt", ["generate", "--audio_attention_weight", "11"], "audio_attention_weight", 11.0),
    ],
)
def test_generation_flags_fail_at_argument_parsing_with_the_apis_message(tmp_path, module, args, field, value):
    """Before any weights load: exit code 2 and the message `POST /v1/sessions` answers for the same value."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert f"argument --{field}: {field_error(field, value)}" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Successful generations


def test_fix_face_writes_video_with_audio_and_frames(runs, outputs):
    result = _ok(runs["fix_face"])
    assert "Denoising" in result.stderr and "2/2" in result.stderr  # the progress bar ran to the end
    assert f"{FRAMES} frames at 27.692 fps" in result.stdout
    # no warning about a --kps_path the user never gave, nor "pip install accelerate" on loading
    assert "kps_path" not in result.stderr and "accelerate" not in result.stderr, result.stderr

    info = _probe_mp4(outputs / "fix_face.mp4")
    assert info["video_codec"] == "h264"
    assert info["size"] == (WIDTH, HEIGHT)
    assert info["frames"].shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert float(info["fps"]) == pytest.approx(FRAMES / FIXTURE_SECONDS, rel=1e-4)  # 27.69: video lasts as the audio
    assert info["audio_codec"] == "aac" and info["audio_rate"] == 16000 and info["audio_channels"] == 1
    assert info["audio_seconds"] == pytest.approx(FIXTURE_SECONDS, abs=0.1)

    frames = _frames(outputs, "fix_face")
    assert frames.std() > 5 and len(np.unique(frames)) > 50  # an image, not a constant
    assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 0.5  # and it moves
    # The video holds these frames, in this order (H.264 is lossy: compare against the next frame's error).
    decoded = info["frames"].astype(np.int16)
    same = np.abs(decoded - frames).mean()
    shifted = np.abs(decoded[1:] - frames[:-1]).mean()
    assert same < 0.75 * shifted, (same, shifted)


def test_mp3_44k_stereo_input(runs, inputs, outputs):
    result = _ok(runs["mp3"])
    seconds = _decoded_seconds(inputs["mp3"])  # MP3 framing may change the length a little
    assert seconds == pytest.approx(MP3_SECONDS, abs=0.05)
    info = _probe_mp4(outputs / "mp3.mp4")
    assert info["frames"].shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert float(info["fps"]) == pytest.approx(FRAMES / seconds, rel=2e-3)
    assert f"{FRAMES} frames at {FRAMES / seconds:.3f} fps" in result.stdout
    # The original audio goes into the video: still 44.1 kHz stereo, cut to the video's length.
    assert info["audio_codec"] == "aac" and info["audio_rate"] == 44100 and info["audio_channels"] == 2
    assert info["audio_seconds"] == pytest.approx(seconds, abs=0.1)
    frames = _frames(outputs, "mp3")
    assert frames.std() > 5


@pytest.mark.parametrize("strategy", ["no_retarget", "offset_retarget", "naive_retarget"])
def test_retarget_strategies(runs, outputs, strategy):
    result = _ok(runs[strategy])
    assert f"{FRAMES} frames" in result.stdout
    assert (outputs / f"{strategy}.mp4").stat().st_size > 1000
    frames = _frames(outputs, strategy)
    assert frames.std() > 5
    if strategy != "no_retarget":
        # The key points drawn differ from the raw driving ones, so the video differs. Same seed, same audio: equal
        # key points give bit-identical frames, so any mean difference is the strategy's. The built random model's
        # guider moves the frames only a little (about 0.05 grey levels on average, 0.5 on the golden fixture's).
        baseline = _frames(outputs, "no_retarget")
        assert np.abs(frames.astype(np.int16) - baseline).mean() > 0.01


def test_generate_with_a_built_in_motion_draws_its_points(runs, outputs):
    """`generate --motion nod --motion_amplitude 3`: the head follows the motion's points, exactly as if they had
    been given as a driving key-point file, and the video differs from one driven by other points."""
    _ok(runs["motion"])
    _ok(runs["motion_as_kps"])
    points = np.load(outputs / "nod_kps.npy")
    assert np.ptp(points[:, 2, 1]) > 1.0  # the nose nods by more than a pixel in the 128x64 frame
    frames = _frames(outputs, "motion")
    assert np.array_equal(frames, _frames(outputs, "motion_as_kps"))
    _ok(runs["no_retarget"])
    assert np.abs(frames.astype(np.int16) - _frames(outputs, "no_retarget")).mean() > 0.01


def test_retargeted_strategies_differ_from_each_other(runs, outputs):
    _ok(runs["offset_retarget"])
    _ok(runs["naive_retarget"])
    assert not np.array_equal(_frames(outputs, "offset_retarget"), _frames(outputs, "naive_retarget"))


def test_stage_1_differs_from_stage_3(runs, outputs):
    _ok(runs["stage_1"])
    _ok(runs["no_retarget"])  # the same command at the default stage_3
    stage_1 = _frames(outputs, "stage_1").astype(np.int16)
    stage_3 = _frames(outputs, "no_retarget").astype(np.int16)
    assert np.abs(stage_1 - stage_3).mean() > 0.5


# ---------------------------------------------------------------------------------------------------------
# Failures: exit code 2, one `error: ...` line, no traceback, no video


def _failure_commands(i: dict[str, Path], outputs: Path) -> dict[str, list[str]]:
    gen = _generate_args
    return {
        "short_audio": gen(i, outputs, "f_short", audio_path=i["short_wav"]),
        "broken_image": gen(i, outputs, "f_image", reference_image_path=i["broken_png"]),
        "missing_audio": gen(i, outputs, "f_audio", audio_path=i["missing"] / "aud.mp3"),
        "missing_kps": gen(i, outputs, "f_kps", retarget_strategy="no_retarget", kps_path=i["missing"] / "kps.pth"),
        "missing_models": gen(i, outputs, "f_models", model_dir=i["empty_model_dir"]),
        "no_insightface": gen(i, outputs, "f_face", reference_kps_path=""),
        "bad_reference_kps": gen(i, outputs, "f_refkps", reference_kps_path=i["bad_reference_kps"]),
        "num_pad_3": gen(i, outputs, "f_pad", num_pad_audio_frames="3"),
        "extract_no_insightface": [
            "extract-kps", "--video_path", str(i["video"]), "--kps_sequence_save_path", str(outputs / "x1.pth"),
            "--audio_save_path", str(outputs / "x1.wav"), "--model_dir", str(i["empty_model_dir"]), "--device", "cpu",
        ],
        "extract_missing_video": [
            "extract-kps", "--video_path", str(i["missing"] / "video.mp4"),
            "--kps_sequence_save_path", str(outputs / "x2.pth"), "--device", "cpu",
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(inputs, outputs):
    """Every CLI run of this module, started together on one pool (generations first); tests wait for theirs."""
    pool = Runs({**_generation_commands(inputs, outputs), **_failure_commands(inputs, outputs)}, outputs)
    yield pool
    pool.close()


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The process failed as a user error: exit 2, no traceback, exactly one line starting with `error: `."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), repr(lines[0])  # on its own line, not glued to a progress bar
    return lines[0]


FAILURES = {
    # name: (output stem, fragments the error line must contain)
    "short_audio": ("f_short", ["audio too short", "context_frames=12"]),
    "broken_image": ("f_image", ["cannot read the reference image", "broken.png"]),
    "missing_audio": ("f_audio", ["--audio_path", "not found", "aud.mp3"]),
    "missing_kps": ("f_kps", ["--kps_path", "not found", "kps.pth"]),
    "no_insightface": ("f_face", ["insightface", "buffalo_l"]),
    "bad_reference_kps": ("f_refkps", ["bad_reference_kps.npy", "(5, 2) or (3, 2)", "(4, 3)"]),
    "num_pad_3": ("f_pad", ["--num_pad_audio_frames 3", "10 tokens"]),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_generate_user_errors(runs, outputs, name):
    stem, fragments = FAILURES[name]
    line = _error_line(runs[name])
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (outputs / f"{stem}.mp4").exists()
    assert not (outputs / f"{stem}.npy").exists()


def test_generate_without_model_folder(runs, inputs, outputs):
    result = runs["missing_models"]
    line = _error_line(result)
    missing = inputs["empty_model_dir"] / "stable-diffusion-v1-5" / "unet" / "config.json"
    assert str(missing) in line
    assert "download-weights" in result.stderr and str(inputs["empty_model_dir"]) in result.stderr
    assert not (outputs / "f_models.mp4").exists()


def test_extract_kps_without_insightface(runs, inputs, outputs):
    line = _error_line(runs["extract_no_insightface"])
    assert "buffalo_l" in line and str(inputs["empty_model_dir"]) in line
    assert not (outputs / "x1.pth").exists()


def test_extract_kps_missing_video(runs, inputs):
    line = _error_line(runs["extract_missing_video"])
    assert "--video_path" in line and "not found" in line and "video.mp4" in line
