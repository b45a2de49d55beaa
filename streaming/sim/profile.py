"""Device profiles: per-call device times measured on a GPU, and the stated rule for calls never measured.

A profile is a JSON file (`streaming/sim/profiles/<name>.json`, or any path) holding, for one device, dtype and
frame size, measured points of each model call, each with where it comes from:

* `audio_features`: ms of one wav2vec2 call by seconds of audio in its span;
* `audio_projection_ms`: one audio projection call (per features call);
* `unet`: ms of one UNet window call by frame-passes (rows x window frames; guidance doubles the rows);
* `decode.full`, `decode.tiny`: ms of one decode call by frames decoded.

The rule for sizes between and beyond the measured points (conservative, never optimistic): below the smallest
point, that point's time (a smaller call is never assumed faster than the smallest one measured: small GPU calls
are launch-bound); between two points, linear interpolation; beyond the largest, linear extrapolation with the
steepest slope between any two measured points (with one point only: proportional to the size). A frame size larger
than the profile's scales the UNet and decode times by the square of the pixel ratio (an upper bound for attention's
quadratic growth); a smaller one keeps the profile's times. A dtype the profile was not measured in is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vexpress_rt.errors import VExpressError

REQUIRED = ("name", "device", "dtype", "width", "height", "rule", "audio_features", "audio_projection_ms", "unet")
DECODERS = ("full", "tiny")


class ProfileError(VExpressError):
    """A profile that cannot be used: missing or malformed fields, or an unknown name."""


@dataclass(frozen=True)
class Curve:
    """Measured (size, ms) points and the conservative rule between and beyond them."""

    points: tuple[tuple[float, float], ...]

    @classmethod
    def parse(cls, where: str, data: Any) -> Curve:
        if not isinstance(data, dict) or not isinstance(data.get("points"), list) or not data["points"]:
            raise ProfileError(f"{where}: needs a non-empty list 'points' of {{x, ms, source}}")
        points = []
        for i, p in enumerate(data["points"]):
            if not isinstance(p, dict) or not all(k in p for k in ("x", "ms", "source")):
                raise ProfileError(f"{where}.points[{i}]: needs x, ms and source, got {p!r}")
            x, ms = p["x"], p["ms"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (x, ms)):
                raise ProfileError(f"{where}.points[{i}]: x and ms must be positive numbers, got {p!r}")
            points.append((float(x), float(ms)))
        points.sort()
        if len({x for x, _ in points}) != len(points):
            raise ProfileError(f"{where}: two points at the same x")
        return cls(tuple(points))

    @property
    def steepest_slope(self) -> float:
        pts = self.points
        if len(pts) == 1:
            return pts[0][1] / pts[0][0]
        return max(max(0.0, (b[1] - a[1]) / (b[0] - a[0])) for i, a in enumerate(pts) for b in pts[i + 1 :])

    def ms(self, x: float) -> float:
        pts = self.points
        if x <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        last_x, last_y = pts[-1]
        return last_y + self.steepest_slope * (x - last_x)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    device: str
    dtype: str
    width: int
    height: int
    rule: str
    audio_features: Curve  # by seconds of audio
    audio_projection_ms: float
    unet: Curve  # by frame-passes per call
    decode: dict[str, Curve]  # by frames per call, per decoder
    source: dict[str, Any]  # the whole JSON (where each figure comes from)

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile") -> DeviceProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: a profile is a JSON object")
        missing = [k for k in REQUIRED if k not in data]
        decode: dict[str, Any] = data.get("decode") or {}
        if not isinstance(data.get("decode"), dict):
            missing.append("decode")
        else:
            missing += [f"decode.{d}" for d in DECODERS if d not in decode]
        if missing:
            raise ProfileError(f"{where}: missing fields {', '.join(missing)}")
        projection = data["audio_projection_ms"]
        if not isinstance(projection, dict) or not isinstance(projection.get("ms"), (int, float)):
            raise ProfileError(f"{where}.audio_projection_ms: needs {{ms, source}}")
        if "source" not in projection:
            raise ProfileError(f"{where}.audio_projection_ms: needs a source")
        for key in ("width", "height"):
            if not isinstance(data[key], int) or data[key] <= 0:
                raise ProfileError(f"{where}.{key}: a positive integer, got {data[key]!r}")
        return cls(
            name=str(data["name"]),
            device=str(data["device"]),
            dtype=str(data["dtype"]),
            width=data["width"],
            height=data["height"],
            rule=str(data["rule"]),
            audio_features=Curve.parse(f"{where}.audio_features", data["audio_features"]),
            audio_projection_ms=float(projection["ms"]),
            unet=Curve.parse(f"{where}.unet", data["unet"]),
            decode={d: Curve.parse(f"{where}.decode.{d}", decode[d]) for d in DECODERS},
            source=data,
        )

    # -- what each call costs (seconds) ----------------------------------------------------------------------
    def _size_factor(self, width: int, height: int) -> float:
        ratio = (width * height) / (self.width * self.height)
        return ratio**2 if ratio > 1 else 1.0

    def features_s(self, audio_s: float) -> float:
        return (self.audio_features.ms(audio_s) + self.audio_projection_ms) / 1000.0

    def unet_s(self, rows: int, frames: int, width: int, height: int) -> float:
        return self.unet.ms(rows * frames) * self._size_factor(width, height) / 1000.0

    def decode_s(self, decoder: str, frames: int, width: int, height: int) -> float:
        if frames <= 0:
            return 0.0
        return self.decode[decoder].ms(frames) * self._size_factor(width, height) / 1000.0

    def check_dtype(self, dtype: str) -> None:
        if dtype != self.dtype:
            raise ProfileError(f"profile {self.name!r} was measured in {self.dtype}, not {dtype}")


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name (shipped with the package: `h100`) or by path to a JSON file. ProfileError otherwise."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ProfileError(f"no profile file at {path}")
        text, where = path.read_text(), str(path)
    else:
        shipped = resources.files("streaming.sim").joinpath("profiles").joinpath(f"{name_or_path}.json")
        if not shipped.is_file():
            raise ProfileError(f"no device profile named {name_or_path!r} (shipped: {', '.join(shipped_profiles())})")
        text, where = shipped.read_text(), f"profile {name_or_path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{where}: not JSON ({exc})") from exc
    return DeviceProfile.from_dict(data, where)


def shipped_profiles() -> list[str]:
    folder = resources.files("streaming.sim").joinpath("profiles")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def is_simulated(device: str) -> bool:
    return str(device).startswith("sim:")


def profile_of(device: str) -> DeviceProfile:
    """`sim:<name or path>` -> its profile."""
    if not is_simulated(device):
        raise ProfileError(f"{device!r} is not a simulated device (sim:<profile>)")
    return load_profile(str(device).removeprefix("sim:"))
