"""A motion from a short video: its face's 3 key points on every frame, found with the portraits' detector.

The sequence is (N, 3, 2) float32 in the video's own pixels, what `vexpress-rt extract-kps --width W --height H`
writes for a W x H video. The session's default `offset_retarget` (and `naive_retarget`) rescale it to the
portrait's face per axis, so the video's size does not matter to them; `no_retarget` reads the points as they are.

The detector is `streaming.portrait.detect_face_kps`: insightface when its models are present, else the cascades,
so it works offline. A frame without a face (or, with insightface, with several) holds the previous frame's
points; frames before the first face take the first face's. The container is named by the caller (sniffed from
the first bytes) so FFmpeg never probes an upload.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vexpress_rt.errors import InputError

from .portrait import detect_face_kps

log = logging.getLogger(__name__)

MAX_VIDEO_S = 30.0  # a motion loops forth and back; a longer clip adds nothing but detection time
MAX_VIDEO_FRAMES = 1800  # 30 s at 60 fps: bounds the detection work whatever the time stamps say


class VideoTooLong(InputError):
    """The video is longer than `MAX_VIDEO_S` (or holds more than `MAX_VIDEO_FRAMES` frames)."""


def motion_from_video(
    data: bytes,
    demuxer: str,
    max_pixels: int,
    insightface_root: str | Path | None = None,
    max_seconds: float = MAX_VIDEO_S,
) -> np.ndarray:
    """The key-point sequence (N, 3, 2) of the video in `data` (container `demuxer`).

    InputError: not decodable, no video stream, frames over `max_pixels`, no face on any frame;
    VideoTooLong: over `max_seconds` or `MAX_VIDEO_FRAMES`."""
    found: list[np.ndarray | None] = []
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            if not container.streams.video:
                raise InputError("the video has no video stream")
            stream = container.streams.video[0]
            # The declared duration refuses a long file before any decoding; the frames' own times below catch a
            # file that understates it.
            if stream.duration is not None and stream.time_base is not None:
                if float(stream.duration * stream.time_base) > max_seconds + 0.05:
                    raise VideoTooLong(f"the video is longer than {max_seconds:g} s")
            _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)  # before decoding
            for frame in container.decode(stream):
                _check_pixels(frame.width, frame.height, max_pixels)  # a stream may change size mid-way
                if (frame.time is not None and frame.time > max_seconds) or len(found) >= MAX_VIDEO_FRAMES:
                    raise VideoTooLong(f"the video is longer than {max_seconds:g} s (or {MAX_VIDEO_FRAMES} frames)")
                found.append(_face_points(frame.to_image(), insightface_root))
    except av.FFmpegError as exc:
        raise InputError(f"not a readable video: {exc}") from exc
    if not found:
        raise InputError("the video holds no frames")
    return _hold_missing(found)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(f"the video's {width}x{height} frames are over {max_pixels} pixels (--max_image_pixels)")


def _face_points(image: Image.Image, insightface_root: str | Path | None) -> np.ndarray | None:
    try:
        return detect_face_kps(image, insightface_root).kps
    except InputError:  # no face (or several, with insightface): the frame holds the previous points
        return None


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
