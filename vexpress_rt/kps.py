"""Face key points for V-Express: loading, length fitting, retargeting, "V" drawing and detection.

Key points are 3 points per frame: image-left eye, image-right eye, nose, as (x, y) pixels of the W x H frame.
Everything numeric here follows the original (tencent-ailab/V-Express 6814f7d) in float32, so that the drawn
images match it bit for bit.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from vexpress_rt.errors import InputError, WeightsError

RETARGET_STRATEGIES = ("fix_face", "no_retarget", "offset_retarget", "naive_retarget")

# Colours of points 0, 1, 2 (RGB); the limbs use the first point's colour x 0.6.
_POINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
_LIMBS = ((0, 2), (1, 2))
_STICK_WIDTH = 4
_POINT_RADIUS = 4


# ----------------------------------------------------------------------------------------------------
# Drawing


def draw_v_kps_image(height: int, width: int, kps: Any) -> np.ndarray:
    """Draw the "V" key-point image (H x W x 3 RGB uint8) exactly like the original's `draw_v_kps_image`.

    Two filled ellipse limbs (point 0 -> nose, then point 1 -> nose) in 60 % of the first point's colour, then
    filled circles of radius 4 at every point. All geometry is computed in float32 like the original, which
    received float32 tensors / arrays, and truncated to int where it did.
    """
    pts = _as_float32_points(kps)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for a, b in _LIMBS:
        xs = pts[[a, b], 0]
        ys = pts[[a, b], 1]
        # np.float32 scalar arithmetic on purpose: the length and mean are float32 in the original.
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = int(math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1])))
        centre = (int(np.mean(xs)), int(np.mean(ys)))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), _STICK_WIDTH), angle, 0, 360, 1)
        colour = [int(float(c) * 0.6) for c in _POINT_COLOURS[a]]
        cv2.fillConvexPoly(canvas, polygon, colour)
    for (x, y), colour in zip(pts, _POINT_COLOURS, strict=True):
        cv2.circle(canvas, (int(x), int(y)), _POINT_RADIUS, colour, -1)
    return canvas


def _as_float32_points(kps: Any) -> np.ndarray:
    if isinstance(kps, torch.Tensor):
        kps = kps.detach().cpu().numpy()
    pts = np.asarray(kps, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2:
        raise InputError(f"key points must have shape (3, 2), got {pts.shape}")
    if not np.isfinite(pts[:3]).all():
        raise InputError("key points contain NaN or infinite values")
    return pts[:3]


# ----------------------------------------------------------------------------------------------------
# Loading and saving


def _numpy_safe_globals() -> list[Any]:
    """The numpy globals a pickled float array needs, for torch.load(weights_only=True).

    The original's kps.pth was written under numpy 1.x and names `numpy.core.multiarray._reconstruct`; numpy 2
    writes `numpy._core.multiarray._reconstruct`. Both names are mapped to the same function. Unpickling a
    dtype also BUILDs an instance of its class (numpy.dtypes.Float32DType etc.), so those classes are needed.
    """
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed: list[Any] = [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
    ]
    dtypes_mod = getattr(np, "dtypes", None)  # numpy >= 1.25
    if dtypes_mod is not None:
        for name in ("Float16DType", "Float32DType", "Float64DType"):
            cls = getattr(dtypes_mod, name, None)
            if cls is not None:
                allowed.append(cls)
    return allowed


NPY_MAGIC = b"\x93NUMPY"  # what a .npy file starts with
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 (the original's kps.pth): a zip archive
_MAX_ZIP_ENTRIES = 100_000  # a kps.pth holds a handful of records per frame at most


def _describe_shape(shape: Sequence[int]) -> str:
    """A shape for an error message, cut short: a hostile file may claim hundreds of dimensions."""
    dims = [str(d) for d in shape[:4]]
    return "(" + ", ".join(dims + (["..."] if len(shape) > 4 else [])) + ")"


def _check_sequence_shape(shape: Sequence[int], source: str, max_frames: int | None) -> None:
    """(N, 3, 2) or (N, 5, 2) with 1 <= N <= max_frames, checked before anything of that size exists."""
    if len(shape) != 3 or shape[1] not in (3, 5) or shape[2] != 2:
        raise InputError(f"{source}: expected key points of shape (N, 3, 2) or (N, 5, 2), got {_describe_shape(shape)}")
    _check_frame_count(shape[0], source, max_frames)


def _check_frame_count(frames: int, source: str, max_frames: int | None) -> None:
    if frames == 0:
        raise InputError(f"{source}: the key-point sequence is empty")
    if max_frames is not None and frames > max_frames:
        raise InputError(f"{source}: {frames} key-point frames, more than the {max_frames} allowed")


def _check_tensor_layout(tensor: torch.Tensor, source: str) -> None:
    """Refuse a tensor whose view claims more elements than its storage holds: expanded (stride 0) or overlapping
    strides make a tiny file read as gigabytes once copied. A view of distinct elements within bounds (e.g. a
    slice) is fine; this looks at sizes and strides only, nothing is read."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size > 1)
    span = 1  # elements covered by the dimensions so far, innermost first
    for stride, size in dims:
        if stride < span:
            raise InputError(f"{source}: the key-point tensor's elements overlap (expanded or overlapping strides)")
        span = stride * (size - 1) + span
    last = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    if tensor.numel() and (last + 1) * tensor.element_size() > tensor.untyped_storage().nbytes():
        raise InputError(f"{source}: the key-point tensor claims more elements than the file holds")


def _row_array(row: Any, source: str) -> np.ndarray:
    """One frame of a list-form sequence, its shape checked before it is converted (or kept)."""
    if isinstance(row, torch.Tensor):
        shape: tuple[int, ...] = tuple(row.shape)
    elif isinstance(row, np.ndarray):
        shape = row.shape
    elif isinstance(row, (list, tuple)) and all(
        isinstance(point, (list, tuple)) and len(point) == 2 and all(isinstance(v, (int, float)) for v in point)
        for point in row
    ):
        shape = (len(row), 2)
    else:
        raise InputError(f"{source}: every key-point frame must be a (3, 2) array, got {type(row).__name__}")
    if shape not in ((3, 2), (5, 2)):
        raise InputError(f"{source}: every key-point frame must have shape (3, 2), got {_describe_shape(shape)}")
    if isinstance(row, torch.Tensor):
        _check_tensor_layout(row, source)
        return row.detach().cpu().numpy()
    return np.asarray(row)


def _to_sequence_array(obj: Any, source: str, max_frames: int | None = None) -> np.ndarray:
    """What a kps file held (tensor, array, list of (3, 2) arrays / tensors) as float32 (N, 3, 2).

    Shapes, frame counts and tensor layouts are checked before anything is copied (see `parse_kps_sequence`)."""
    try:
        if isinstance(obj, torch.Tensor):
            _check_sequence_shape(tuple(obj.shape), source, max_frames)
            _check_tensor_layout(obj, source)
            arr = obj.detach().cpu().numpy()
        elif isinstance(obj, np.ndarray):
            _check_sequence_shape(obj.shape, source, max_frames)
            arr = obj
        elif isinstance(obj, (list, tuple)):
            _check_frame_count(len(obj), source, max_frames)
            arr = np.stack([_row_array(row, source) for row in obj])
        else:
            raise InputError(f"{source}: expected a list of (3, 2) key-point arrays, got {type(obj).__name__}")
    except (ValueError, TypeError) as exc:
        raise InputError(f"{source}: the key-point frames do not all have the same shape ({str(exc)[:200]})") from exc
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{source}: key points must be numbers, got dtype {arr.dtype.name}")
    _check_sequence_shape(arr.shape, source, max_frames)
    arr = np.ascontiguousarray(arr[:, :3, :], dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{source}: key points contain NaN or infinite values")
    return arr


def load_kps_sequence(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Load a driving key-point sequence as float32 (N, 3, 2) from a file (see `parse_kps_sequence`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"key-point file not found: {path}")
    return parse_kps_sequence(path.read_bytes(), str(path), max_frames)


def parse_kps_sequence(data: bytes, source: str = "the key-point file", max_frames: int | None = None) -> np.ndarray:
    """A driving key-point sequence as float32 (N, 3, 2) from a file's bytes; `source` names it in errors.

    Accepts the original's `kps.pth` (torch.save of a list of float32 (3, 2) numpy arrays, or a tensor) and
    `.npy` arrays of shape (N, 3, 2) or (N, 5, 2), told apart by their first bytes. The .pth file is read with
    weights_only=True and a minimal numpy allow-list, so a file holding anything else (arbitrary objects, code)
    is refused. Nothing larger than the file is ever made: a .npy's header, a kps.pth's zip directory
    (uncompressed records that fit in the file) and every tensor's shape and strides (no expanded or overlapping
    views) are checked, with the frame count against `max_frames`, before any data is copied.
    """
    if data.startswith(NPY_MAGIC):
        return _npy_sequence(data, source, max_frames)
    if data.startswith(ZIP_MAGIC):
        return _to_sequence_array(_torch_zip_object(data, source), source, max_frames)
    raise InputError(
        f"cannot read key-point file {source}: expected a kps.pth (torch.save's zip format, as `extract-kps` "
        "writes) or a .npy array"
    )


def _npy_sequence(data: bytes, source: str, max_frames: int | None) -> np.ndarray:
    """A .npy read header first: dtype, shape and data size are checked before the data is looked at."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise InputError(f"cannot read key-point array {source}: .npy format version {version} is not supported")
    except ValueError as exc:
        raise InputError(f"cannot read key-point array {source}: not a valid .npy header") from exc
    if dtype.hasobject or dtype.kind not in "fiu":
        raise InputError(f"{source}: key points must be numbers, got dtype {dtype.name}")
    _check_sequence_shape(shape, source, max_frames)
    count = math.prod(shape)
    available = len(data) - stream.tell()
    if count * dtype.itemsize > available:
        raise InputError(
            f"{source}: the .npy header promises {count * dtype.itemsize} bytes of key points, the file holds "
            f"{available}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return _to_sequence_array(flat.reshape(shape, order="F" if fortran_order else "C"), source, max_frames)


def _torch_zip_object(data: bytes, source: str) -> Any:
    """torch.load of a kps.pth, after its zip directory shows only uncompressed records that fit in the file
    (torch reads deflated records too: a small file would inflate to gigabytes)."""
    refused = (
        f"cannot read key-point file {source}: expected torch.save of a list of float32 (3, 2) numpy arrays "
        "(the original kps.pth format) or of a tensor"
    )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"{refused}: not a readable zip archive") from exc
    if len(entries) > _MAX_ZIP_ENTRIES:
        raise InputError(f"{refused}: {len(entries)} records is too many")
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        raise InputError(f"{refused}: compressed records are not accepted (torch.save writes them uncompressed)")
    if sum(entry.file_size for entry in entries) > len(data):
        raise InputError(f"{refused}: its records claim more bytes than the file holds")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message is a page of advice on loading untrusted files unsafely: not for an upload's sender
        raise InputError(f"{refused}: it holds other objects") from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as exc:
        raise InputError(f"{refused}: the file is damaged") from exc


def save_kps_sequence(path: str | Path, seq: np.ndarray | Sequence[np.ndarray]) -> None:
    """Write a sequence in the original's kps.pth format: torch.save of a list of float32 (3, 2) arrays."""
    arr = _to_sequence_array(list(seq) if not isinstance(seq, np.ndarray) else seq, "key-point sequence")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save([np.array(frame, dtype=np.float32) for frame in arr], path)


def load_reference_kps(path: str | Path) -> np.ndarray:
    """Load reference key points (float32 (3, 2)) from JSON or .npy, instead of running the face detector.

    JSON: a list of [x, y] pairs (5 as insightface gives, or 3) or {"kps": [...]}.
    .npy: shape (5, 2) or (3, 2).
    Only the first 3 points (eye, eye, nose) are returned, as in the original.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference key-point file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                if "kps" not in data:
                    raise InputError(f"{path}: JSON object has no 'kps' entry")
                data = data["kps"]
            arr = np.asarray(data, dtype=np.float32)
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.dtype.kind not in "fiu":
                raise InputError(f"{path}: key points must be numbers, got dtype {arr.dtype}")
            arr = arr.astype(np.float32)
        else:
            raise InputError(f"reference key points must be a .json or .npy file, got {path.name}")
    except (ValueError, TypeError, OSError, EOFError) as exc:
        raise InputError(f"cannot read reference key points {path}: {exc}") from exc
    if arr.ndim != 2 or arr.shape not in ((3, 2), (5, 2)):
        raise InputError(f"{path}: reference key points must have shape (5, 2) or (3, 2), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{path}: reference key points contain NaN or infinite values")
    return np.ascontiguousarray(arr[:3])


# ----------------------------------------------------------------------------------------------------
# Length fitting and retargeting


def fit_kps_length(seq: np.ndarray, video_length: int) -> np.ndarray:
    """The original's length adjustment: cut to `video_length` if longer, then always interpolate in time.

    Linear interpolation with align_corners=False in float32 (torch), which is the identity when the lengths
    already match and stretches a shorter sequence.
    """
    if video_length < 1:
        raise InputError(f"video length must be at least 1 frame, got {video_length}")
    arr = _to_sequence_array(seq, "key-point sequence")
    t = torch.from_numpy(arr)[:video_length]  # (N, 3, 2)
    t = torch.nn.functional.interpolate(t.permute(1, 2, 0), size=video_length, mode="linear", align_corners=False)
    return np.ascontiguousarray(t.permute(2, 0, 1).numpy(), dtype=np.float32)


def _eye_nose_ratio(k: np.ndarray) -> float:
    """Distance eye0-nose over eye1-nose; squares summed in float32, sqrt in double, like the original."""
    d_left = math.sqrt((k[0][0] - k[2][0]) ** 2 + (k[0][1] - k[2][1]) ** 2)
    d_right = math.sqrt((k[1][0] - k[2][0]) ** 2 + (k[1][1] - k[2][1]) ** 2)
    return d_left / (d_right + 1e-6)


def _face_size(k: np.ndarray) -> tuple[float, np.floating]:
    """(eye-to-eye distance as a python float, nose-to-eye-segment distance as a float32 scalar)."""
    a, b, c = k[0], k[1], k[2]
    eye_dist = math.sqrt((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2)
    # Distance from the nose to the closest point of the eye segment, all in float32 numpy like the original.
    line_vec = b - a
    line_len = np.sqrt(np.sum(line_vec**2))
    t: Any = np.dot(line_vec / line_len, (c - a) * 1.0 / line_len)
    if t < 0.0:
        t = 0.0
    elif t > 1.0:
        t = 1.0
    nearest = a + t * line_vec
    nose_dist = np.sqrt(np.sum((c - nearest) ** 2))
    return eye_dist, nose_dist


def _select_scale_frame(ref: np.ndarray, seq: np.ndarray) -> int:
    """Frame used to measure the scales, with the original's bug reproduced on purpose.

    The intent is the frame whose eye/nose ratio is closest to the reference's, but after each match the
    threshold is overwritten with the frame's raw ratio (about 1), not with the difference, so in practice the
    last frame within ~1 of the reference ratio wins (usually the last frame).
    """
    ref_ratio = _eye_nose_ratio(ref)
    threshold: float = 10000.0
    selected = 0
    for idx, frame in enumerate(seq):
        ratio = _eye_nose_ratio(frame)
        if math.fabs(ratio - ref_ratio) < threshold:
            selected = idx
            threshold = ratio  # sic: the original stores the ratio, not the difference
    return selected


def _scaled_driving(ref: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Driving kps scaled per axis so the selected frame's face size matches the reference's (float32)."""
    sel = _select_scale_frame(ref, seq)
    ref_eye, ref_nose = _face_size(ref)
    tgt_eye, tgt_nose = _face_size(seq[sel])
    if tgt_eye == 0.0 or float(tgt_nose) == 0.0:
        raise InputError(f"driving key points of frame {sel} are degenerate (eyes and nose coincide or align)")
    scale_w = ref_eye / tgt_eye  # python float
    scale_h = ref_nose / tgt_nose  # float32 scalar
    scaled = np.array(seq, dtype=np.float32)
    # In-place on float32: numpy casts the scales to float32, as in the original.
    scaled[:, :, 0] *= scale_w
    scaled[:, :, 1] *= scale_h
    return scaled


def retarget(strategy: str, reference_kps: np.ndarray, driving_seq: np.ndarray | None, video_length: int) -> np.ndarray:
    """Key points for each of `video_length` frames (float32 (L, 3, 2)), by the original's strategies.

    * ``fix_face``: the reference kps for every frame; `driving_seq` is ignored and may be None.
    * ``no_retarget``: the driving kps after `fit_kps_length`, as absolute pixel positions.
    * ``offset_retarget``: the reference kps minus half the nose displacement of each driving frame
      relative to driving frame 0, after scaling the driving kps to the reference face size.
    * ``naive_retarget``: the scaled driving kps, translated so that frame 0's nose lands on the
      reference nose.

    Quirks of the original reproduced on purpose, so outputs match it:

    * the driving sequence is always length-fitted (cut, then linearly interpolated) before retargeting;
    * the frame used to measure the scales is chosen with the original's buggy loop (the threshold is
      overwritten with the frame's raw eye/nose ratio), which in practice picks the last frame (see
      `_select_scale_frame`);
    * the scales are eye-to-eye distance (x) and nose-to-eye-line distance (y) ratios, reference / driving;
    * ``offset_retarget`` applies the nose offset halved and with its sign inverted
      (reference - offset / 2), so the face moves opposite to the driver;
    * arithmetic is float32 where the original's was (float32 arrays with python-float scales).
    """
    if strategy not in RETARGET_STRATEGIES:
        raise InputError(f"unknown retarget strategy {strategy!r}; choose one of {', '.join(RETARGET_STRATEGIES)}")
    if video_length < 1:
        raise InputError(f"video length must be at least 1 frame, got {video_length}")
    ref = _as_float32_points(reference_kps)
    if strategy == "fix_face":
        return np.ascontiguousarray(np.repeat(ref[np.newaxis], video_length, axis=0))
    if driving_seq is None:
        raise InputError(f"retarget strategy {strategy!r} needs a driving key-point sequence (--kps)")
    seq = fit_kps_length(driving_seq, video_length)
    if strategy == "no_retarget":
        return seq
    scaled = _scaled_driving(ref, seq)
    if strategy == "offset_retarget":
        nose_offset = (scaled[:, 2, :] - scaled[0, 2, :])[:, np.newaxis, :]
        out = np.tile(ref, (video_length, 1, 1))
        out -= nose_offset / 2.0  # sic: halved and sign-inverted, as in the original
        return out
    # naive_retarget
    scaled[:, :, 0] -= scaled[0, 2, 0] - ref[2][0]
    scaled[:, :, 1] -= scaled[0, 2, 1] - ref[2][1]
    return scaled


# ----------------------------------------------------------------------------------------------------
# Face detection (insightface buffalo_l)


def insightface_pack_dir(insightface_root: str | Path) -> Path:
    """Where the buffalo_l ONNX files must be: <root>/models/buffalo_l/ (root: <model_dir>/insightface_models)."""
    return Path(insightface_root) / "models" / "buffalo_l"


def _check_insightface_models(insightface_root: str | Path) -> Path:
    pack = insightface_pack_dir(insightface_root)
    if not pack.is_dir() or not any(pack.rglob("*.onnx")):
        raise WeightsError(
            f"insightface face-detector models not found: {pack} must hold the buffalo_l .onnx files "
            f"(det_10g.onnx, ...). Get them with `vexpress-rt download-weights`, or download buffalo_l.zip "
            f"from the insightface model release and unzip it into that folder."
        )
    return pack


class FaceDetector:
    """insightface FaceAnalysis('buffalo_l') set up like the original; never downloads models.

    The original calls prepare(det_size=(H, W)) although insightface reads it as (W, H); kept as-is.
    """

    def __init__(
        self,
        insightface_root: str | Path,
        height: int = 512,
        width: int = 512,
        device: str = "cpu",
        gpu_id: int = 0,
    ) -> None:
        # Checked before insightface is touched: given a missing folder it would download the pack.
        _check_insightface_models(insightface_root)
        root = Path(insightface_root)
        from insightface.app import FaceAnalysis

        use_cuda = device.startswith("cuda")
        provider_kwargs: dict[str, Any] = {
            "providers": ["CUDAExecutionProvider" if use_cuda else "CPUExecutionProvider"]
        }
        if use_cuda:
            # The original passes provider_options=[] on CPU, which onnxruntime rejects (length mismatch)
            # before retrying without it; leaving it out gives the same session without the error print.
            provider_kwargs["provider_options"] = [{"device_id": gpu_id}]
        try:
            self._app = FaceAnalysis(name="buffalo_l", root=str(root), **provider_kwargs)
            self._app.prepare(ctx_id=0, det_size=(height, width))
        except AssertionError as exc:  # insightface asserts when no detection model was found
            raise WeightsError(f"no face-detection model in {insightface_pack_dir(root)}") from exc
        except Exception as exc:  # onnxruntime: corrupt or truncated .onnx files
            raise WeightsError(f"cannot load the insightface models in {insightface_pack_dir(root)}: {exc}") from exc

    def detect_kps(self, bgr_image: np.ndarray) -> tuple[int, np.ndarray | None]:
        """(number of faces, first face's 3 key points as float32 (3, 2), or None when there is no face)."""
        faces = self._app.get(bgr_image)
        if not faces:
            return 0, None
        return len(faces), np.ascontiguousarray(np.asarray(faces[0].kps[:3], dtype=np.float32))

    def reference_kps_from_image(self, path: str | Path, width: int, height: int) -> np.ndarray:
        """Reference kps as the original: cv2.imread (BGR), bilinear resize to W x H, 1st face's kps[:3]."""
        image = cv2.imread(str(path))
        if image is None:
            raise InputError(f"cannot read reference image {path}")
        image = cv2.resize(image, (width, height))
        count, kps = self.detect_kps(image)
        if kps is None:
            raise InputError(f"no face found in reference image {path} (after resizing to {width}x{height})")
        return kps


def extract_kps_sequence_and_audio(
    video_path: str | Path,
    kps_sequence_save_path: str | Path,
    audio_save_path: str | Path | None,
    insightface_root: str | Path,
    width: int = 512,
    height: int = 512,
    device: str = "cpu",
) -> np.ndarray:
    """The original's scripts/extract_kps_sequence_and_audio.py, without an ffmpeg binary.

    Every frame is resized to W x H (bilinear, BGR) and must contain exactly one face; its kps[:3] are
    collected and saved in the kps.pth format. The audio track is written to `audio_save_path` (format from
    its extension; None skips it).
    Returns the (N, 3, 2) float32 sequence.
    """
    import av

    from vexpress_rt.media import extract_audio

    detector = FaceDetector(insightface_root, height=height, width=width, device=device)
    if audio_save_path is not None:
        extract_audio(video_path, audio_save_path)

    kps_frames: list[np.ndarray] = []
    try:
        with av.open(str(video_path)) as container:
            if not container.streams.video:
                raise InputError(f"{video_path} has no video stream")
            for idx, frame in enumerate(container.decode(video=0)):
                bgr = cv2.resize(frame.to_ndarray(format="bgr24"), (width, height))
                count, kps = detector.detect_kps(bgr)
                if count != 1 or kps is None:
                    raise InputError(f"there are {count} faces in frame {idx} of {video_path}; exactly one is required")
                kps_frames.append(kps)
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode video {video_path}: {exc}") from exc
    if not kps_frames:
        raise InputError(f"{video_path} has no video frames")
    seq = np.stack(kps_frames)
    save_kps_sequence(kps_sequence_save_path, seq)
    return seq
