"""`vexpress-rt push`: the smallest voice-bot integration. It speaks the session websocket's protocol
(docs/websocket.md) with the `websockets` package: waits for `session.ready`, decodes an audio file with PyAV and
resamples it to the rate the session declared, pushes PCM16 in 20 ms messages (at real time, or as fast as the
server's `buffer` events allow while staying at most `--max-lead-ms` ahead of playback), sends `audio.end`, prints
every server event as one JSON line, and exits 0 once `playback.finished` arrives (2 on an `error` event, a refused
connection, an unreadable file or the timeout).

    vexpress-rt push "ws://localhost:8080/v1/sessions/<id>/ws?token=<token>" --audio speech.wav --as-fast-as-allowed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

from vexpress_rt.errors import InputError
from vexpress_rt.media import load_audio, resample_pcm

from ..access.origins import redact


def add_push_command(sub) -> None:
    p = sub.add_parser(
        "push",
        help="push an audio file into a session over its websocket and print the playback events",
        description="A bot client: push an audio file into a session's websocket (PCM16 at the session's rate), "
        "print the server's events as JSON lines, exit 0 when playback.finished arrives (2 on errors).",
    )
    p.add_argument("url", help="the session's ws_url, e.g. ws://host:8080/v1/sessions/<id>/ws?token=<token>")
    p.add_argument("--audio", required=True, help="audio file (WAV, MP3, OGG...; any rate and channel count)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--realtime",
        dest="mode",
        action="store_const",
        const="realtime",
        help="push at the pace of real time, like a live TTS stream (default)",
    )
    mode.add_argument(
        "--as-fast-as-allowed",
        dest="mode",
        action="store_const",
        const="fast",
        help="push ahead of playback, as far as --max-lead-ms allows (the server's buffer events)",
    )
    p.add_argument("--token", help="the session token, sent as Authorization: Bearer (else put ?token= in the URL)")
    p.add_argument("--chunk-ms", type=int, default=20, help="audio per message; default 20")
    p.add_argument(
        "--max-lead-ms",
        type=float,
        default=2000.0,
        help="--as-fast-as-allowed: stay at most this far ahead of playback; default 2000",
    )
    p.add_argument("--close", action="store_true", help="end the session (session.close) after playback")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds; default 600")
    p.set_defaults(mode="realtime", func=cmd_push)


def pcm16_for(path: str, sample_rate: int, channels: int) -> np.ndarray:
    """The file as int16 (n, channels) at the session's rate and channel count."""
    audio = load_audio(path)
    samples = resample_pcm(audio.samples, audio.sample_rate, sample_rate)  # (file channels, n)
    if samples.shape[0] != channels:
        samples = np.repeat(samples.mean(axis=0, keepdims=True), channels, axis=0)
    return np.clip(np.round(samples.T * 32768.0), -32768, 32767).astype("<i2")


async def push(
    url: str,
    audio_path: str,
    mode: str = "realtime",
    token: str | None = None,
    chunk_ms: int = 20,
    max_lead_ms: float = 2000.0,
    close: bool = False,
    out=None,
) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    out = out or sys.stdout

    def show(text: str) -> None:
        print(text, file=out, flush=True)

    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(url, additional_headers=headers, max_size=1 << 22) as ws:
        ready = json.loads(await ws.recv())
        show(json.dumps(ready))
        if ready.get("type") != "session.ready":
            print(f"error: expected session.ready, got {ready.get('type')!r}", file=sys.stderr)
            return 2
        rate, channels = int(ready["sample_rate"]), int(ready["channels"])
        try:
            pcm = pcm16_for(audio_path, rate, channels)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        chunk = max(1, rate * chunk_ms // 1000)
        ended = asyncio.Event()  # audio.end sent
        lead_known = asyncio.Event()
        lead = {"buffered_ms": 0.0, "sent_ms": 0.0}  # server's last figure + what was sent since
        started: set = set()
        result: dict = {}

        async def read_events() -> None:
            try:
                async for text in ws:
                    show(text if isinstance(text, str) else json.dumps({"type": "binary", "bytes": len(text)}))
                    event = json.loads(text) if isinstance(text, str) else {}
                    kind = event.get("type")
                    if kind == "buffer":
                        lead["buffered_ms"], lead["sent_ms"] = float(event["buffered_ms"]), 0.0
                        lead_known.set()
                    elif kind == "playback.started":
                        started.add(event.get("utterance"))
                    elif kind == "playback.finished" and event.get("utterance") in started:
                        if ended.is_set() or event.get("interrupted"):
                            result.setdefault("code", 0)
                            return
                    elif kind == "error":
                        print(f"error: {event.get('code')}: {event.get('message')}", file=sys.stderr)
                        result.setdefault("code", 2)
                        return
            except ConnectionClosed:
                pass
            if "code" not in result:
                print("error: the server closed the connection", file=sys.stderr)
                result["code"] = 2

        reader = asyncio.get_running_loop().create_task(read_events())
        t0 = time.monotonic()
        try:
            for k, start in enumerate(range(0, len(pcm), chunk)):
                if reader.done():
                    break
                if mode == "realtime":
                    await asyncio.sleep(max(0.0, t0 + k * chunk / rate - time.monotonic()))
                else:
                    while lead["buffered_ms"] + lead["sent_ms"] > max_lead_ms and not reader.done():
                        lead_known.clear()
                        waiter = asyncio.ensure_future(lead_known.wait())
                        await asyncio.wait([reader, waiter], return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                piece = pcm[start : start + chunk]
                await ws.send(piece.tobytes())
                lead["sent_ms"] += 1000.0 * len(piece) / rate
            if not reader.done():
                await ws.send(json.dumps({"type": "audio.end"}))
                ended.set()
                print(f"pushed {len(pcm) / rate:.2f} s of audio in {time.monotonic() - t0:.2f} s", file=sys.stderr)
            await reader
        except ConnectionClosed:
            reader.cancel()
            result.setdefault("code", 2)
            print("error: the server closed the connection", file=sys.stderr)
        if close and result.get("code") == 0:
            await ws.send(json.dumps({"type": "session.close"}))
        return result.get("code", 2)


def cmd_push(args: argparse.Namespace) -> int:
    from websockets.exceptions import InvalidStatus, InvalidURI, WebSocketException

    async def main() -> int:
        return await asyncio.wait_for(
            push(args.url, args.audio, args.mode, args.token, args.chunk_ms, args.max_lead_ms, args.close),
            args.timeout,
        )

    try:
        return asyncio.run(main())
    except asyncio.TimeoutError:
        print(f"error: no playback.finished within {args.timeout:g} s", file=sys.stderr)
    except InvalidStatus as exc:
        body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
        print(f"error: the server refused the websocket: HTTP {exc.response.status_code} {body}", file=sys.stderr)
    except (InvalidURI, WebSocketException, OSError) as exc:
        # the session's token is a credential: not in the terminal's scrollback
        print(f"error: cannot connect to {redact(args.url)}: {redact(str(exc))}", file=sys.stderr)
    return 2
