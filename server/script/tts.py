"""Text to speech for script items: the command of `--tts-command` (piper, espeak-ng...), run once per text.

The command is a template split like a shell would (`shlex`), then run as an argument list (no shell): `{text}` is
replaced by the text, `{out}` by the path of a WAV file in a fresh temporary folder, e.g.

    --tts-command "espeak-ng -v en-us -w {out} {text}"
    --tts-command "sh -c 'echo \\"$0\\" | piper --model en_US-lessac-medium.onnx --output_file {out}' {text}"

Each placeholder is replaced once, in one pass (a text that reads "{out}" is spoken as such). It gets
`--tts_timeout_s` and its file `--max_upload_mb` at most; the file is then decoded like an upload
(`audio_file.decode_audio_bytes`, containers allowed by `sniff`). A text is never taken for an option: one that
starts with `-` gets a space in front. The command runs in a process group of its own, which is killed and reaped
however the run ends (done, failed, timed out, or cancelled by a stop, a DELETE or the session closing); at most
`--tts_max_procs` run at once on the whole server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

from ..errors import ApiError
from ..settings.tts_template import parse_template

MAX_TEXT_CHARS = 5000
STDERR_SHOWN = 300
RETRY_AFTER_S = 5
KILL_WAIT_S = 5.0  # after the kill, how long its stderr may stay open (a child that left its group)
_PLACEHOLDER = re.compile(r"\{(text|out)\}")


class TtsError(ApiError):
    def __init__(self, message: str):
        super().__init__(422, message, code="tts_failed")


def fill(template: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """The arguments with each placeholder replaced in one pass: a text that reads "{out}" stays that text."""
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], a) for a in template]


class TtsCommand:
    """The server's TTS command, with at most `max_procs` of its processes running at once (whole server)."""

    def __init__(self, template: tuple[str, ...], timeout_s: float = 30.0, max_bytes: int = 20 << 20, max_procs=2):
        self.template, self.timeout_s, self.max_bytes, self.max_procs = template, timeout_s, max_bytes, max_procs
        self._slots = asyncio.Semaphore(max_procs)

    @classmethod
    def from_config(cls, command: str, timeout_s: float, max_bytes: int, max_procs: int = 2) -> TtsCommand:
        return cls(tuple(parse_template(command)), timeout_s, max_bytes, max_procs)

    def check_free(self) -> None:
        """503 + Retry-After while every process slot is taken (a new script is refused rather than queued)."""
        if self._slots.locked():
            raise ApiError(
                503,
                f"{self.max_procs} TTS processes are running (at most {self.max_procs}, --tts_max_procs); try again "
                "later",
                code="busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def synthesize(self, text: str) -> bytes:
        """The audio file the command made of `text` (its bytes); TtsError (422) when it fails. Waits for a free
        process slot. However it ends (done, failed, timed out, cancelled), its process group is killed and reaped."""
        text = text.strip()
        if not text or len(text) > MAX_TEXT_CHARS or "\0" in text:
            raise ApiError(400, f"a text item needs 1 to {MAX_TEXT_CHARS} characters (no NUL)")
        if text.startswith("-"):
            text = " " + text
        async with self._slots:
            with tempfile.TemporaryDirectory(prefix="vexpress-tts-") as folder:
                out = Path(folder) / "speech.wav"
                await self._run(fill(self.template, {"text": text, "out": str(out)}), folder)
                if not out.is_file() or out.stat().st_size == 0:
                    raise TtsError("the TTS command wrote no audio file")
                if out.stat().st_size > self.max_bytes:
                    raise TtsError(f"the TTS command wrote more than {self.max_bytes / 2**20:g} MiB")
                return out.read_bytes()

    async def _run(self, args: list[str], folder: str) -> None:
        # Started by the stdlib (vfork + exec, no Python in the child), not by the event loop: uvloop's spawn runs
        # Python's after-fork handlers in the child, which clear the other threads' state; a PyAV object held by
        # one of them (the media pump's threads) then waits forever on a lock in the child, before it ever execs,
        # and a killpg cannot reach it (it has no group of its own yet). Seen in test_script's present run.
        try:  # a session of its own: whatever it starts (a shell's pipeline) is killed with it
            proc = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=folder,
                start_new_session=True,
            )
        except OSError as exc:
            raise TtsError(f"the TTS command could not start: {exc}") from exc
        done = asyncio.ensure_future(asyncio.to_thread(proc.communicate))
        try:
            _, err = await asyncio.wait_for(asyncio.shield(done), self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise TtsError(f"the TTS command took longer than {self.timeout_s:g} s") from exc
        finally:
            # shielded: a cancelled script (stop, DELETE, session closed) still waits here until it is reaped
            await _shielded(_kill_and_reap(proc, done))
        if proc.returncode != 0:
            shown = err.decode("utf-8", "replace").strip()[:STDERR_SHOWN]
            raise TtsError(f"the TTS command failed (exit {proc.returncode}): {shown}")


async def _kill_and_reap(proc: subprocess.Popen, communicating: asyncio.Future) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its group: also what it left running after it exited
    # communicate() returns once the process is gone and its stderr closed; something that left the group and
    # kept the pipe open must not hold the reaping up
    await asyncio.wait({communicating}, timeout=KILL_WAIT_S)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await asyncio.to_thread(proc.wait)


async def _shielded(coro) -> None:
    """Run `coro` to its end even when the caller is cancelled meanwhile (then re-raise the cancellation)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
