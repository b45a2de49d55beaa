"""A device profile from a GPU run: `scripts/gpu_check.sh` writes one after its bench, so every GPU run
recalibrates the simulator.

    python -m streaming.sim.calibrate bench_gpu.json decoders.json --name h100 > profile_gpu.json

Reads the JSON of `bench --gpu --json` (its `gpu.components`: a staggered UNet window replayed from a CUDA graph
and the full VAE decode at 1-8 steps, batch 1 and 4; its one-session run's audio-features time per frame) and of
`bench --decoders --json` (the full and tiny decoders, ms per frame), and writes a profile every field of which
names the measurement it comes from. The result is checked as the simulator checks it (`DeviceProfile`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .profile import DeviceProfile, ProfileError

RULE = (
    "below the smallest measured size: that size's time; between sizes: linear interpolation; beyond the largest: "
    "linear with the steepest measured slope; larger frames: times x (pixel ratio)^2; "
    "the device runs one call at a time"
)


def _points(pairs: dict[float, tuple[float, str]]) -> list[dict[str, Any]]:
    return [{"x": x, "ms": round(ms, 3), "source": source} for x, (ms, source) in sorted(pairs.items())]


def profile_from_bench(bench: dict[str, Any], decoders: dict[str, Any], name: str) -> dict[str, Any]:
    """The profile (a JSON-ready dict) from the bench's output; ProfileError when a figure it needs is missing."""
    gpu = bench.get("gpu")
    if not isinstance(gpu, dict) or "skipped" in gpu:
        raise ProfileError("the bench JSON has no GPU figures (no `gpu` section, or it was skipped)")
    components = gpu.get("components")
    if not components:
        raise ProfileError("the bench JSON has no `gpu.components` (run it without --no_components)")
    settings = bench.get("settings", {})
    new_frames = int(settings.get("new_frames", 2))
    unet: dict[float, tuple[float, str]] = {}
    full: dict[float, tuple[float, str]] = {}
    for c in components:
        passes = c["batch"] * c["window_frames"]
        source = f"bench --gpu components: UNet graph replay, {c['steps']} steps, batch {c['batch']}"
        if passes not in unet or c["unet_graph_ms"] > unet[passes][0]:  # two measurements of one size: the slower
            unet[passes] = (c["unet_graph_ms"], source)
        frames = c["batch"] * new_frames
        if frames not in full or c["decode_ms"] > full[frames][0]:
            full[frames] = (c["decode_ms"], f"bench --gpu components: VAE decode of {frames} frames")
    per_frame = decoders.get("ms_per_frame", {})
    call = int(decoders.get("frames_per_call", 2))
    if "tiny" not in per_frame or "full" not in per_frame:
        raise ProfileError("the decoders JSON (`bench --decoders --json`) has no ms_per_frame for full and tiny")
    tiny: dict[float, tuple[float, str]] = {
        call: (per_frame["tiny"] * call, f"bench --decoders: TAESD, {call} frames per call")
    }
    full.setdefault(call, (per_frame["full"] * call, f"bench --decoders: VAE, {call} frames per call"))
    runs = gpu.get("runs") or []
    first = next((r for r in runs if r.get("sessions") == 1), None)
    if first is None or "audio_features" not in first.get("device_ms_per_frame", {}):
        raise ProfileError("the bench JSON has no one-session run with audio-feature times")
    span_s = 2.0 + 0.2 + 2 * new_frames / 25  # the session's wav2vec2 span: left context, lookahead, two chunks
    features_ms = first["device_ms_per_frame"]["audio_features"] * new_frames  # one call per chunk
    profile = {
        "name": name,
        "device": gpu.get("device", "unknown"),
        "dtype": gpu.get("dtype", "fp16"),
        "width": int(gpu.get("width", 512)),
        "height": int(gpu.get("height", 512)),
        "measured": "scripts/gpu_check.sh: bench --gpu --json and bench --decoders --json",
        "rule": RULE,
        "audio_features": {
            "x": "seconds of audio in one wav2vec2 call",
            "points": _points(
                {round(span_s, 3): (features_ms, "bench --gpu, one session: audio-feature ms per frame x new frames")}
            ),
        },
        "audio_projection_ms": {"ms": 0.0, "source": "included in the audio-feature time of the bench"},
        "unet": {"x": "frame-passes per call (batch rows x window frames)", "points": _points(unet)},
        "decode": {
            "full": {"x": "frames per call", "points": _points(full)},
            "tiny": {"x": "frames per call", "points": _points(tiny)},
        },
    }
    DeviceProfile.from_dict(profile, "calibrated profile")  # refuse here what the simulator would refuse
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a simulator device profile from a GPU run's bench JSON")
    parser.add_argument("bench_json")
    parser.add_argument("decoders_json")
    parser.add_argument("--name", default="gpu")
    args = parser.parse_args(argv)
    try:
        with open(args.bench_json) as f:
            bench = json.load(f)
        with open(args.decoders_json) as f:
            decoders = json.load(f)
        profile = profile_from_bench(bench, decoders, args.name)
    except (OSError, json.JSONDecodeError, ProfileError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(profile, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
