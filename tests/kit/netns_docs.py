"""Run every runnable code block of the README and docs as written, in a loopback-only network namespace.

    unshare -n bash -c 'ip link set lo up && exec python tests/kit/netns_docs.py WORKDIR --timeout 600'

In the namespace the documented addresses are free and mean this machine only: `vexpress-rt serve` listens on
localhost:8080 as the tour says, an RTMP ingest (tests/kit/rtmp_ingest.py) on localhost:1935 stands in for the media
server of the `present` recipe. Blocks run in document order in one working folder (tests/kit/docs_blocks.py says which
and why not): shell blocks with bash (`-e -o pipefail`; a `vexpress-rt serve` line is started in the background
and waited for until /readyz answers), Python blocks with python. Where a snippet only defines a function, the
CHECKS below call it the way its text says, and check what a reader would see. Prints one `REPORT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kit.docs_blocks import Block, all_blocks
from kit.paths import KIT, pythonpath

READY_TIMEOUT_S = 300.0
BLOCK_TIMEOUT_S = 600.0
INGEST = "rtmp://127.0.0.1:1935/live/show"  # the present recipe's rtmp://127.0.0.1/live/show

# A fresh session and the demo speech as 20 ms PCM16 chunks, for the snippets that take them.
_SESSION = """
import json, urllib.request, wave
_req = urllib.request.Request("http://localhost:8080/v1/sessions", data=b"{}", method="POST",
                              headers={"Content-Type": "application/json"})
_session = json.load(urllib.request.urlopen(_req, timeout=60))
with wave.open("speech.wav") as _w:
    _pcm = _w.readframes(_w.getnframes())
    _speech_ms = 1000 * _w.getnframes() / _w.getframerate()
"""

# Python to run after a block (keyed by a line of the block): call what it defines as its text says, and check.
AFTER = {
    "async def speak(ws_url, token, tts_chunks)": _SESSION
    + """
async def _chunks():
    for i in range(0, len(_pcm), 640):  # 20 ms of 16 kHz PCM16
        yield _pcm[i : i + 640]
_event = asyncio.run(speak(_session["ws_url"], _session["token"], _chunks()))
assert _event["type"] == "playback.finished" and not _event["interrupted"], _event
assert abs(_event["position_ms"] - _speech_ms) <= 40, (_event, _speech_ms)  # all of it was said
print("DOCS-CHECK said", _event["position_ms"], "of", _speech_ms, "ms")
""",
    "async def say(ws_url: str, token: str, pcm16: bytes) -> dict:": _SESSION
    + """
_event = asyncio.run(say(_session["ws_url"], _session["token"], _pcm))
assert _event["type"] == "playback.finished" and not _event["interrupted"], _event
assert abs(_event["position_ms"] - _speech_ms) <= 40, (_event, _speech_ms)  # all of it, not a tenth
print("DOCS-CHECK said", _event["position_ms"], "of", _speech_ms, "ms")
""",
    "magic, version, flags, size, index, pts_us": """
assert magic == b"VXRT" and version == 1 and size == 44, (magic, version, size)
assert jpeg[:2] == b"\\xff\\xd8" and len(pcm) == 2 * samples == 2 * rate // 25, (jpeg[:2], len(pcm), samples)
print("DOCS-CHECK frame", index, width, "x", height)
""",
}
# Python to run before a block: what its text assumes is at hand.
BEFORE = {
    "magic, version, flags, size, index, pts_us": _SESSION
    + """
import asyncio
from websockets.asyncio.client import connect
async def _one_frame():
    async with connect(f"{_session['frames_url']}?token={_session['token']}") as ws:
        assert json.loads(await ws.recv())["type"] == "stream.start"
        return await ws.recv()
message = asyncio.run(_one_frame())
""",
}
# What a shell block's output must show besides its exit code 0 (keyed by a line of the block).
SHELL_OUTPUT = {
    "vexpress-rt push ": '"type":"playback.finished"',
    "--data-binary @intro.wav": '"utterance_ms"',
    "vexpress-rt present show.yaml --server": '"type":"present.done"',
    "--background '#00b140' --output_path ./framed.mp4": "Saved ./framed.mp4",  # before the tour's generate
    "vexpress-rt generate --model_dir ./demo_model": "Saved ./out.mp4",
}


def _key(table: dict[str, str], block: Block) -> str | None:
    return next((k for k in table if k in block.text), None)


def _commands(text: str) -> list[str]:
    """Logical lines (backslash continuations joined), comments and blank lines kept in place."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _wait_ready(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server on port {port} was not ready within {READY_TIMEOUT_S:g} s")


class Runner:
    def __init__(self, work: Path):
        self.work = work
        self.env = dict(
            os.environ,
            PYTHONPATH=pythonpath(),
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        self.background: list[subprocess.Popen] = []

    def shell(self, block: Block) -> tuple[int, str]:
        script, output = [], ""
        for command in _commands(block.text):
            if command.lstrip().startswith("vexpress-rt serve"):
                rc, out = self._bash("\n".join(script))
                output, script = output + out, []
                if rc:
                    return rc, output
                self._serve(command, len(self.background))
            else:
                script.append(command)
        rc, out = self._bash("\n".join(script))
        return rc, output + out

    def _bash(self, script: str) -> tuple[int, str]:
        if not script.strip():
            return 0, ""
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=self.work, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def _serve(self, command: str, n: int) -> None:
        port = int(m.group(1)) if (m := re.search(r"--port\s+(\d+)", command)) else 8080
        log = self.work / f"serve{n}.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(
                ["bash", "-c", "exec " + command], cwd=self.work, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.background.append(server)
        _wait_ready(port, server, log)

    def python(self, block: Block) -> tuple[int, str]:
        before, after = BEFORE.get(_key(BEFORE, block) or "", ""), AFTER.get(_key(AFTER, block) or "", "")
        path = self.work / f"snippet_{Path(block.file).stem}_{block.line}.py"
        path.write_text(before + "\n" + block.text + "\n" + after)
        done = subprocess.run(
            [sys.executable, str(path)], cwd=self.work, env=self.env, capture_output=True, text=True,
            timeout=BLOCK_TIMEOUT_S,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def ingest(self) -> subprocess.Popen:
        script = KIT / "rtmp_ingest.py"
        proc = subprocess.Popen(
            [sys.executable, str(script), INGEST, str(self.work / "show.flv")],
            cwd=self.work, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().startswith("listening")
        self.background.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def run(work: Path, report: dict) -> None:
    runner = Runner(work)
    report["blocks"] = []
    try:
        for block in all_blocks():
            if not block.runs:
                continue
            started = time.monotonic()
            ingest = runner.ingest() if "--to rtmp://127.0.0.1/live/show" in block.text else None
            rc, output = runner.shell(block) if block.language != "python" else runner.python(block)
            expected = SHELL_OUTPUT.get(_key(SHELL_OUTPUT, block) or "")
            ok = rc == 0 and (expected is None or expected in output)
            if ok and ingest is not None:  # the ingest recorded the presentation
                ok = (work / "show.flv").is_file() and (work / "show.flv").stat().st_size > 10_000
            if ok and "vexpress-rt make-demo-model" in block.text:  # the files a reader's own recipes name
                for name in ("speech.wav", "intro.wav"):
                    shutil.copy(work / "demo_model" / "samples" / "speech.wav", work / name)
            report["blocks"].append(
                {
                    "where": block.where,
                    "ok": ok,
                    "rc": rc,
                    "seconds": round(time.monotonic() - started, 1),
                    "output": output[-1500:] if not ok else "\n".join(output.splitlines()[-3:]),
                }
            )
    finally:
        runner.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()

    def expired(signum, frame):
        raise TimeoutError(f"docs run over {args.timeout} s")

    signal.signal(signal.SIGALRM, expired)
    signal.alarm(args.timeout)
    report: dict = {}
    t0 = time.monotonic()
    try:
        run(args.work, report)
    except BaseException as exc:  # reported, so the test shows what happened
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["seconds"] = round(time.monotonic() - t0, 1)
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
