"""The frames websocket's wire format (`GET /v1/sessions/{id}/frames`, schema in docs/websocket.md): one binary
message per frame, a fixed 44-byte header + the picture (JPEG; WebP with an alpha plane when the header's `FLAG_ALPHA`
is set: sessions with `background: "transparent"`) + the frame's PCM16 audio. The server packs it
(server/websockets/frames.py), clients parse it; both import it from here, so a client never imports the server.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAGIC = b"VXRT"
VERSION = 1
FLAG_SPEAKING = 1
FLAG_ALPHA = 2  # the picture is a WebP with an alpha plane (RGBA), not a JPEG; RGB frames are unchanged
# magic, version, flags, header size, frame index, pts (us), sample rate, samples, JPEG bytes, width, height,
# utterance (0 while idle); little-endian, no padding: 44 bytes
HEADER = struct.Struct("<4sBBHQqIIIHHI")


@dataclass
class FrameMessage:
    index: int
    pts_us: int
    speaking: bool
    utterance: int
    sample_rate: int
    width: int
    height: int
    jpeg: bytes  # the encoded picture: a JPEG, or a WebP with alpha when `alpha` is set
    audio: np.ndarray  # int16 (samples,)
    alpha: bool = False

    def image(self) -> np.ndarray:
        """The decoded picture: uint8 (height, width, 4) RGBA when the frame has alpha, else (height, width, 3) RGB."""
        with Image.open(io.BytesIO(self.jpeg)) as picture:
            return np.asarray(picture.convert("RGBA" if self.alpha else "RGB"))


def parse_frame(data: bytes) -> FrameMessage:
    """The inverse of `pack_frame` (what a consumer does); ValueError for anything else."""
    if len(data) < HEADER.size:
        raise ValueError(f"a frame message has at least {HEADER.size} bytes, got {len(data)}")
    magic, version, flags, size, index, pts_us, rate, samples, jpeg_len, width, height, utt = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a version-{VERSION} frame message: {magic!r} v{version}")
    if len(data) != size + jpeg_len + 2 * samples:
        raise ValueError(f"frame message of {len(data)} bytes, its header says {size + jpeg_len + 2 * samples}")
    jpeg = data[size : size + jpeg_len]
    audio = np.frombuffer(data, dtype="<i2", count=samples, offset=size + jpeg_len)
    return FrameMessage(
        index, pts_us, bool(flags & FLAG_SPEAKING), utt, rate, width, height, jpeg, audio, bool(flags & FLAG_ALPHA)
    )
