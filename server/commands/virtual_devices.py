"""Where `vexpress-rt camera` writes: a virtual camera and a virtual microphone that video-call apps can pick.

* Video: `pyvirtualcam` (v4l2loopback on Linux, OBS Virtual Camera on Windows and macOS), RGB frames.
* Audio: a PulseAudio/PipeWire null sink, fed by `pacat` (pulseaudio-utils; PipeWire's pipewire-pulse answers it
  too); the call app picks the sink's monitor, or the remapped source made in the README's setup, as microphone.

Both sit behind two small protocols (`VideoSink`, `AudioSink`) so that the pacing (`camera.py`) is tested with
objects that record what they get. Setup commands per platform: README, "Presenting".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

CAMERA_SETUP = (
    "Linux: sudo apt-get install v4l2loopback-dkms && "
    'sudo modprobe v4l2loopback devices=1 video_nr=10 card_label="vexpress-rt" exclusive_caps=1; '
    "Windows/macOS: install OBS Studio and start its Virtual Camera once (README, Presenting)"
)
MIC_SETUP = (
    "pactl load-module module-null-sink sink_name=vexpress sink_properties=device.description=vexpress-rt && "
    "pactl load-module module-remap-source master=vexpress.monitor source_name=vexpress_mic "
    "source_properties=device.description=vexpress-rt-mic (pacat: apt-get install pulseaudio-utils)"
)
LOOPBACK_DEVICES = Path("/sys/devices/virtual/video4linux")
MAX_PENDING_S = 0.5  # audio the sink may fall behind by before it is dropped (and counted)


class DeviceError(Exception):
    """A virtual device cannot be opened or written; the message says how to set it up."""


class VideoSink(Protocol):
    def send(self, image: np.ndarray) -> None:
        """One RGB frame (height, width, 3) uint8; may block while the device takes it."""

    def close(self) -> None: ...


class AudioSink(Protocol):
    def write(self, pcm: np.ndarray) -> bool:
        """PCM16 mono samples; False when they were dropped because the sink is behind."""

    def close(self) -> None: ...


def check_devices(device: str | None, backend: str | None, mic: bool) -> None:
    """What can be checked before a session is opened for the devices (DeviceError with the setup line): pyvirtualcam,
    on Linux a v4l2loopback camera (the named one, or any), and `pacat` for the microphone."""
    try:
        import pyvirtualcam  # noqa: F401  (only whether it is installed)
    except ImportError as exc:
        raise DeviceError("pyvirtualcam is not installed: pip install 'vexpress-rt[camera]'") from exc
    if sys.platform.startswith("linux") and backend in (None, "v4l2loopback"):
        loopbacks = sorted(LOOPBACK_DEVICES.glob("video*"))  # v4l2loopback's devices are virtual ones
        if device is not None and not Path(device).exists():
            raise DeviceError(f"no camera device {device}\nSet one up: {CAMERA_SETUP}")
        if device is None and not loopbacks:
            raise DeviceError(f"no virtual camera (no v4l2loopback device)\nSet one up: {CAMERA_SETUP}")
    if mic and shutil.which("pacat") is None:
        raise DeviceError(f"pacat not found; set up the virtual microphone: {MIC_SETUP} (or give --no-mic)")


class VirtualCamera:
    """A pyvirtualcam camera of the session's size and fps (`backend`: None picks the platform's)."""

    def __init__(self, width: int, height: int, fps: float, device: str | None = None, backend: str | None = None):
        try:  # optional dependency (pip install 'vexpress-rt[camera]'): only this command needs it
            import pyvirtualcam
        except ImportError as exc:
            raise DeviceError("pyvirtualcam is not installed: pip install 'vexpress-rt[camera]'") from exc
        try:
            self._camera = pyvirtualcam.Camera(
                width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device, backend=backend
            )
        except RuntimeError as exc:
            raise DeviceError(f"no virtual camera: {exc}\nSet one up: {CAMERA_SETUP}") from exc
        self.device: str = self._camera.device

    def send(self, image: np.ndarray) -> None:
        self._camera.send(np.ascontiguousarray(image))

    def close(self) -> None:
        self._camera.close()


class PulseAudioSink:
    """PCM16 mono into a PulseAudio/PipeWire sink through `pacat`. Writes never block: when the sound server falls
    more than `MAX_PENDING_S` behind, what is pending is dropped (whole samples) and counted."""

    def __init__(self, sink: str, sample_rate: int, latency_ms: int = 60):
        pacat = shutil.which("pacat")
        if pacat is None:
            raise DeviceError(f"pacat not found; set up the virtual microphone: {MIC_SETUP}")
        cmd = [
            pacat, "--playback", "--raw", f"--device={sink}", "--format=s16le", f"--rate={sample_rate}",
            "--channels=1", f"--latency-msec={latency_ms}", "--client-name=vexpress-rt", "--stream-name=avatar",
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._pending = b""
        self._max_pending = int(MAX_PENDING_S * sample_rate) * 2
        self.dropped_bytes = 0

    def write(self, pcm: np.ndarray) -> bool:
        if self._proc.poll() is not None:
            error = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace").strip()
            raise DeviceError(f"pacat exited ({error or self._proc.returncode}); {MIC_SETUP}")
        self._pending += np.asarray(pcm, dtype="<i2").tobytes()
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            written = 0
        self._pending = self._pending[written:]
        if len(self._pending) <= self._max_pending:
            return True
        # Keep the stream aligned on samples: an odd byte already half-written stays, the rest goes.
        keep = len(self._pending) % 2
        self.dropped_bytes += len(self._pending) - keep
        self._pending = self._pending[:keep]
        return False

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=2)
