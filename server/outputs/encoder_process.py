"""The live encoder in a child process: `mp4_writer.Mp4Writer` run by `python -m server.outputs.encoder_process`.

Why a process: PyAV holds the GIL while FFmpeg connects and handshakes with the ingest (measured: 280 ms for RTMP
on loopback; up to the network timeout on a silent network). In the server's process that stalls every thread, the
event loop that paces the sessions and the model worker included: each output start cost its session 5-6 skipped
frames. In a child, only the child waits.

Protocol, on the child's stdin/stdout: length-prefixed pickles. The parent sends `(target, fps, spec)`, then lists
of AVFrames; the child answers each list with `("ok", bytes_out)` or `("error", exception class)` (then it exits):
never FFmpeg's message, which may quote what the peer said. `None` ends it: the child flushes, closes the stream and
exits. Stderr goes to the parent's; FFmpeg's own log stays off (PyAV's default), for the same reason.

The child opens only what the server built (server/outputs/target.py `encoder_url`): `rtmp://127.0.0.1:<relay>/...`
or `srt://<checked address>:<port>?<caller options>`; anything else is refused before FFmpeg sees it (PyAV opens an
output without protocol options, so FFmpeg's `protocol_whitelist` cannot be set; the prefix check stands in).
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from typing import IO, Any

from .mp4_writer import EncodeSpec, Mp4Writer

HEADER = struct.Struct("<I")
CLOSE_TIMEOUT_S = 10.0
OPENABLE = ("rtmp://127.0.0.1:", "srt://")  # what the server hands the child (target.py encoder_url)


def send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """The next object; EOFError when the other side is gone."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        raise EOFError
    size = HEADER.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)  # noqa: S301 (our own parent, over a pipe)


class EncoderProcess:
    """`write(frames)` and `close()` like Mp4Writer's, from a thread of the parent; the encoding in a child."""

    def __init__(self, target: str, fps: int, spec: EncodeSpec):
        self.bytes_out = 0
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "server.outputs.encoder_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in, self._out = self._proc.stdin, self._proc.stdout
        send(self._in, (target, fps, spec))  # the URL (its stream key) never appears on a command line

    def write(self, frames: list) -> None:
        try:
            send(self._in, frames)
            kind, value = receive(self._out)
        except (OSError, EOFError) as exc:
            raise ConnectionError(f"the encoder process ended (exit {self._proc.poll()})") from exc
        if kind == "error":
            raise ConnectionError(value)
        self.bytes_out = value

    def close(self) -> None:
        try:
            send(self._in, None)
            self._in.close()
        except OSError:
            pass
        try:
            self._proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._out.close()


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    target, fps, spec = receive(stdin)
    if not isinstance(target, str) or not target.startswith(OPENABLE) or not all("!" <= c <= "~" for c in target):
        send(stdout, ("error", "refused"))
        return 2
    writer = Mp4Writer(target, fps, spec)
    try:
        while (frames := receive(stdin)) is not None:
            try:
                writer.write(frames)
            except Exception as exc:  # the ingest dropped: tell the parent, which reconnects with a new process
                send(stdout, ("error", type(exc).__name__))
                return 1
            send(stdout, ("ok", writer.bytes_out))
    except EOFError:  # the parent went away
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
