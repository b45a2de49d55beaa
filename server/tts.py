"""Text to speech for script items: the command of `--tts-command` (piper, espeak-ng...), run once per text.

The command is a template split like a shell would (`shlex`), then run as an argument list (no shell): `{text}` is
replaced by the text, `{out}` by the path of a WAV file in a fresh temporary folder, e.g.

    --tts-command "espeak-ng -v en-us -w {out} {text}"
    --tts-command "sh -c 'echo \\"$0\\" | piper --model en_US-lessac-medium.onnx --output_file {out}' {text}"

It gets `--tts_timeout_s` (then it is killed) and its file `--max_upload_mb` at most; the file is then read like an
upload (`speak.decode_audio_bytes`, containers allowed by `sniff`). A text is never taken for an option: one that
starts with `-` gets a space in front.
"""

from __future__ import annotations

import asyncio
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ApiError

MAX_TEXT_CHARS = 5000
STDERR_SHOWN = 300


class TtsError(ApiError):
    def __init__(self, message: str):
        super().__init__(422, message, code="tts_failed")


def parse_template(command: str) -> list[str]:
    """The command's arguments; ValueError unless it has both placeholders."""
    args = shlex.split(command)
    if not args or not any("{text}" in a for a in args) or not any("{out}" in a for a in args):
        raise ValueError(f"--tts-command {command!r} needs the placeholders {{text}} and {{out}}")
    return args


@dataclass(frozen=True)
class TtsCommand:
    template: tuple[str, ...]
    timeout_s: float = 30.0
    max_bytes: int = 20 << 20

    @classmethod
    def from_config(cls, command: str, timeout_s: float, max_bytes: int) -> TtsCommand:
        return cls(tuple(parse_template(command)), timeout_s, max_bytes)

    async def synthesize(self, text: str) -> bytes:
        """The audio file the command made of `text` (its bytes); TtsError (422) when it fails."""
        text = text.strip()
        if not text or len(text) > MAX_TEXT_CHARS or "\0" in text:
            raise ApiError(400, f"a text item needs 1 to {MAX_TEXT_CHARS} characters (no NUL)")
        if text.startswith("-"):
            text = " " + text
        with tempfile.TemporaryDirectory(prefix="vexpress-tts-") as folder:
            out = Path(folder) / "speech.wav"
            args = [a.replace("{text}", text).replace("{out}", str(out)) for a in self.template]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=folder
                )
            except OSError as exc:
                raise TtsError(f"the TTS command could not start: {exc}") from exc
            try:
                _, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
            except asyncio.TimeoutError as exc:
                proc.kill()
                await proc.wait()
                raise TtsError(f"the TTS command took longer than {self.timeout_s:g} s") from exc
            if proc.returncode != 0:
                shown = err.decode("utf-8", "replace").strip()[:STDERR_SHOWN]
                raise TtsError(f"the TTS command failed (exit {proc.returncode}): {shown}")
            if not out.is_file() or out.stat().st_size == 0:
                raise TtsError("the TTS command wrote no audio file ({out})")
            if out.stat().st_size > self.max_bytes:
                raise TtsError(f"the TTS command wrote more than {self.max_bytes / 2**20:g} MiB")
            return out.read_bytes()
