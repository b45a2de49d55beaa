"""A motion from a short video: its face's 3 key points on every frame, found with the portraits' detector.

The sequence is (N, 3, 2) float32 in the video's own pixels, what `vexpress-rt extract-kps --width W --height H`
writes for a W x H video. The session's default `offset_retarget` (and `naive_retarget`) rescale it to the
portrait's face per axis, so the video's size does not matter to them; `no_retarget` reads the points as they are.

The detector is `streaming.portrait.detect_face_kps`: insightface when its models are present, else the cascades,
so it works offline. A frame without a face (or, with insightface, with several) holds the previous frame's
points; frames before the first face take the first face's. The container is named by the caller (sniffed from
the first bytes) so FFmpeg never probes an upload.

What one upload may cost is bounded: only the codecs of `VIDEO_CODECS` are decoded, frames over
`MAX_VIDEO_PIXELS` are refused before decoding, each frame is scaled by FFmpeg to at most `DETECTION_SIDE` pixels
on its long side before the detector sees it, and a time budget and the caller's stop event are checked between
frames, so a frame's cost is bounded and the whole extraction stops within one frame when either says so.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import av
import numpy as np

from vexpress_rt.errors import InputError

from .portrait import detect_face_kps

log = logging.getLogger(__name__)

MAX_VIDEO_S = 30.0  # a motion loops forth and back; a longer clip adds nothing but detection time
MAX_VIDEO_FRAMES = 1800  # 30 s at 60 fps: bounds the detection work whatever the time stamps say
MAX_VIDEO_PIXELS = 3840 * 2160  # 4K UHD: larger frames cost seconds to decode and tell nothing more about a face
DETECTION_SIDE = 640  # the long side frames are scaled to before detection (insightface's det_size, the cascades')
BUDGET_S = 180.0  # default time budget of one extraction (the server's --motion_video_budget_s)
# Decoders by name, with what to call them: what phones, cameras and browsers' MediaRecorder write. The rest
# (MPEG-4 part 2, ProRes, MJPEG, ...) are refused before decoding: each decoder is more attack surface.
VIDEO_CODECS = {"h264": "H.264", "hevc": "HEVC", "vp8": "VP8", "vp9": "VP9", "av1": "AV1", "libdav1d": "AV1"}


class VideoTooLong(InputError):
    """The video is longer than `MAX_VIDEO_S` (or holds more than `MAX_VIDEO_FRAMES` frames)."""


class VideoTooLarge(InputError):
    """The video's frames are over the pixel cap."""


class VideoOverBudget(InputError):
    """Analysing the video took longer than its time budget."""


class UnsupportedCodec(InputError):
    """The video's codec is not one of `VIDEO_CODECS`."""


class ExtractionStopped(Exception):
    """The caller's stop event was set (its client left): the extraction ended at the next frame."""


def motion_from_video(
    data: bytes,
    demuxer: str,
    max_pixels: int,
    insightface_root: str | Path | None = None,
    max_seconds: float = MAX_VIDEO_S,
    budget_s: float = BUDGET_S,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """The key-point sequence (N, 3, 2) of the video in `data` (container `demuxer`), in the video's pixels.

    InputError: not decodable, no video stream, no face on any frame; UnsupportedCodec: not in `VIDEO_CODECS`;
    VideoTooLarge: frames over `max_pixels` or `MAX_VIDEO_PIXELS`; VideoTooLong: over `max_seconds` or
    `MAX_VIDEO_FRAMES`; VideoOverBudget: still going after `budget_s`; ExtractionStopped: `stop` was set."""
    pixel_cap = min(max_pixels, MAX_VIDEO_PIXELS)
    deadline = time.monotonic() + budget_s
    found: list[np.ndarray | None] = []
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            if not container.streams.video:
                raise InputError("the video has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            if codec not in VIDEO_CODECS:
                allowed = ", ".join(dict.fromkeys(VIDEO_CODECS.values()))
                raise UnsupportedCodec(f"the video's codec {codec[:32]!r} is not accepted; use one of {allowed}")
            # The declared duration refuses a long file before any decoding; the frames' own times below catch a
            # file that understates it.
            if stream.duration is not None and stream.time_base is not None:
                if float(stream.duration * stream.time_base) > max_seconds + 0.05:
                    raise VideoTooLong(f"the video is longer than {max_seconds:g} s")
            _check_pixels(stream.codec_context.width, stream.codec_context.height, pixel_cap)  # before decoding
            # And in the decoder: a frame larger than the header said is refused before it is allocated.
            stream.codec_context.options = {"max_pixels": str(pixel_cap)}
            for frame in container.decode(stream):
                if stop is not None and stop.is_set():
                    log.info("motion video: extraction stopped by its caller after %d frames", len(found))
                    raise ExtractionStopped(f"stopped after {len(found)} frames")
                if time.monotonic() > deadline:
                    raise VideoOverBudget(
                        f"analysing the video took more than {budget_s:g} s ({len(found)} frames done): send a "
                        "shorter clip"
                    )
                _check_pixels(frame.width, frame.height, pixel_cap)  # a stream may change size mid-way
                if (frame.time is not None and frame.time > max_seconds) or len(found) >= MAX_VIDEO_FRAMES:
                    raise VideoTooLong(f"the video is longer than {max_seconds:g} s (or {MAX_VIDEO_FRAMES} frames)")
                found.append(_face_points(frame, insightface_root))
    except av.FFmpegError as exc:
        raise InputError(f"not a readable video: {str(exc)[:200]}") from exc
    if not found:
        raise InputError("the video holds no frames")
    return _hold_missing(found)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoTooLarge(
            f"the video's {width}x{height} frames are over {max_pixels} pixels (at most 3840x2160 and "
            "--max_image_pixels)"
        )


def _face_points(frame: av.VideoFrame, insightface_root: str | Path | None) -> np.ndarray | None:
    """The face's points in the frame's pixels, found on the frame scaled to `DETECTION_SIDE` (FFmpeg scales from
    YUV: a full-size RGB copy of a large frame is never made)."""
    scale = min(1.0, DETECTION_SIDE / max(frame.width, frame.height))
    width, height = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
    image = frame.to_image(width=width, height=height)
    try:
        kps = detect_face_kps(image, insightface_root).kps
    except InputError:  # no face (or several, with insightface): the frame holds the previous points
        return None
    return (kps * np.array([frame.width / width, frame.height / height], np.float32)).astype(np.float32)


def _hold_missing(found: list[np.ndarray | None]) -> np.ndarray:
    """Frames without a face take the previous face's points; leading ones the first face's."""
    first = next((kps for kps in found if kps is not None), None)
    if first is None:
        raise InputError(
            f"no face found in any of the video's {len(found)} frames: use a clip where one face is clearly visible, "
            "upright and facing the camera"
        )
    missing = sum(kps is None for kps in found)
    if missing:
        log.info("motion video: %d of %d frames without a face hold the previous points", missing, len(found))
    held, last = [], first
    for kps in found:
        last = kps if kps is not None else last
        held.append(last)
    return np.stack(held).astype(np.float32)
