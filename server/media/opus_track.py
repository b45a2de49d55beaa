"""The avatar's audio handed to aiortc already Opus-encoded, on the event loop.

Why: aiortc encodes every 20 ms audio frame in the loop's default executor, one frame in flight per sender, queued
behind the sessions' VP8 encodes there. With 4 sessions at 512x512 on 2 cores the audio sender fell behind real
time, and the pump's bounded per-track queue dropped the frames it had not sent: the peers received 0.06-0.1 s of
audio per second while the video ran at 24 fps (docs/simulator.md, host figures). libopus takes a small fraction
of a millisecond for 20 ms of mono: encoding here, and handing aiortc an `av.Packet` (which its sender only packs),
takes the executor round trip out of the audio path. Used when the answer's audio codec is Opus (it is for
browsers and aiortc peers); any other codec gets frames, encoded by aiortc as before.
"""

from __future__ import annotations

from fractions import Fraction

import av
from aiortc.sdp import SessionDescription

from .pump import AvatarAudioTrack, MediaPump

OPUS = "audio/opus"
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_BITRATE = 96000  # aiortc's own


def answered_codec(sdp: str, kind: str) -> str | None:
    """The codec (lower-case MIME type) the answer `sdp` chose for its first `kind` m-line, or None."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == kind and media.rtp.codecs:
            return media.rtp.codecs[0].mimeType.lower()
    return None


class OpusAudioTrack(AvatarAudioTrack):
    """AvatarAudioTrack whose 20 ms frames come out as Opus packets once `use_opus()` was called."""

    def __init__(self, pump: MediaPump):
        super().__init__(pump)
        self._opus = False
        self._codec: av.AudioCodecContext | None = None

    def use_opus(self) -> None:
        self._opus = True

    async def recv(self) -> av.AudioFrame | av.Packet:  # type: ignore[override]
        frame = await super().recv()
        if not self._opus or frame.sample_rate not in OPUS_RATES:
            return frame
        if self._codec is None or self._codec.sample_rate != frame.sample_rate:
            codec = av.CodecContext.create("libopus", "w")
            codec.bit_rate = OPUS_BITRATE
            codec.sample_rate = frame.sample_rate
            codec.format = "s16"
            codec.layout = "mono"
            codec.options = {"application": "voip"}
            self._codec = codec
        if frame.samples != self._codec.frame_size and self._codec.is_open:
            return frame  # not one Opus frame: aiortc's encoder rechunks it
        packets = self._codec.encode(frame)  # one 20 ms frame in, one packet out (libopus holds none back)
        return _stamped(packets[0], frame) if len(packets) == 1 else frame


def _stamped(packet: av.Packet, frame: av.AudioFrame) -> av.Packet:
    """The packet on the frame's clock (aiortc converts it to Opus's 48 kHz RTP clock)."""
    packet.pts = frame.pts
    packet.time_base = Fraction(1, frame.sample_rate)
    return packet
