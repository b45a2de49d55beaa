"""`vexpress-rt present script.yaml --to rtmp://...`: a whole presentation from the command line.

It opens a session (on `--server`, or on a server run in this process from the `serve` flags: `--model_dir`,
`--tts-command`...), pushes it to every `--to` output, waits until they are live, plays the script (audio paths are
relative to the YAML file and uploaded with it), prints the script's progress as JSON lines, then stops the outputs
and the session and exits: 0 when the script finished, 2 otherwise. The YAML is a script as the API takes it
(server/script/items.py), with file paths for `audio`:

    items:
      - audio: intro.wav
      - pause_s: 0.5
      - text: Welcome to the product demo.     # needs --tts-command (or a server that has one)
      - mark: demo-start
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from ..errors import ApiError
from ..outputs.target import OutputSettings
from ..serving.inprocess import InProcessServer
from ..settings.config import ConfigError, ServerConfig, add_serve_arguments

READY_TIMEOUT_S = 600.0
LIVE_TIMEOUT_S = 30.0
POLL_S = 0.25
ENDED = ("finished", "stopped", "failed")
# `serve` flags that mean nothing to the server `present` runs in this process (hidden from its --help)
NOT_FOR_PRESENT = {
    "host",
    "port",
    "tls_cert",
    "tls_key",
    "tls_self_signed",
    "allowed_host",
    "allowed_origin",
    "insecure_no_auth",
    "web_root",
}


class PresentError(Exception):
    """Why the presentation could not run (one line for the user)."""


def add_present_command(sub) -> None:
    p = sub.add_parser(
        "present",
        help="run a script (YAML) on a session pushed to RTMP/SRT/WHIP outputs, exit when it ends",
        description="Present a script: a session pushed to --to outputs plays it, then everything stops.",
    )
    p.add_argument("script", help="the script: YAML (or JSON) with items (audio paths relative to it)")
    p.add_argument(
        "--to",
        action="append",
        required=True,
        help="an output URL (rtmp://, rtmps://, srt://, whip+https://); repeatable",
    )
    p.add_argument(
        "--server", help="a running server's URL (its --api-key with --api-key); default: serve in this process"
    )
    p.add_argument("--video-bitrate-kbps", type=int, default=None, help="outputs' video bitrate; default 2500")
    p.add_argument("--keyframe-interval-s", type=float, default=None, help="outputs' keyframe interval; default 2")
    p.add_argument(
        "--lead-in-s", type=float, default=1.0, help="the avatar idles this long before the script; default 1"
    )
    p.add_argument("--tail-s", type=float, default=1.0, help="and this long after it; default 1")
    p.add_argument("--report", help="write the final report (script and outputs, JSON) to this file")
    add_serve_arguments(p)
    for action in p._actions:  # where the in-process server listens is fixed (127.0.0.1, a free port, HTTP)
        if action.dest in NOT_FOR_PRESENT:
            action.help = argparse.SUPPRESS
    p.set_defaults(func=cmd_present)


def load_script(path: Path) -> tuple[dict, dict[str, Path]]:
    """(the script as the API takes it, the files to upload by field name)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PresentError(f"cannot read the script {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise PresentError(f"{path}: a script is a mapping with 'items' (a list)")
    files: dict[str, Path] = {}
    items = []
    for index, item in enumerate(data["items"]):
        if isinstance(item, dict) and "audio" in item:
            file = (path.parent / str(item["audio"])).resolve()
            if not file.is_file():
                raise PresentError(f"{path}: item {index}: no audio file {file}")
            field = f"audio{index}"
            files[field] = file
            item = {**item, "audio": field}
        items.append(item)
    return {**data, "items": items}, files


def _print(message: dict) -> None:
    print(json.dumps(message, separators=(",", ":")), flush=True)


class Presenter:
    def __init__(self, http: aiohttp.ClientSession, base: str, api_key: str | None):
        self.http = http
        self.base = base.rstrip("/")
        self.key_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session: dict = {}

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.session['token']}"}

    async def _json(self, method: str, url: str, expect: int, **kw) -> dict:
        async with self.http.request(method, url, **kw) as r:
            text = await r.text()
            if r.status != expect:
                raise PresentError(f"{method} {url.removeprefix(self.base)}: {r.status} {text[:300]}")
            return json.loads(text) if text else {}

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            async with self.http.get(f"{self.base}/readyz") as r:
                body = await r.json()
                if r.status == 200 or body.get("status") == "full":
                    return
                if body.get("status") == "failed":
                    raise PresentError(f"the server failed to start: {body.get('error')}")
            await asyncio.sleep(0.5)
        raise PresentError(f"the server was not ready within {READY_TIMEOUT_S:g} s")

    async def run(self, script: dict, files: dict[str, Path], outputs: list[dict], lead_in: float, tail: float):
        self.session = await self._json("POST", f"{self.base}/v1/sessions", 201, json={}, headers=self.key_headers)
        url = self.session["url"]
        _print({"type": "present.session", "id": self.session["id"]})
        try:
            made = [await self._json("POST", f"{url}/outputs", 201, json=o, headers=self.auth) for o in outputs]
            await self._wait_live([m["id"] for m in made])
            await asyncio.sleep(lead_in)
            form = aiohttp.FormData()
            form.add_field("script", json.dumps(script), content_type="application/json")
            for field, path in files.items():
                form.add_field(field, path.read_bytes(), filename=path.name, content_type="application/octet-stream")
            report = await self._json("POST", f"{url}/script", 201, data=form, headers=self.auth)
            report = await self._follow(url, report)
            await asyncio.sleep(tail)
            final = [await self._json("DELETE", f"{url}/outputs/{m['id']}", 200, headers=self.auth) for m in made]
            return report, final
        finally:
            async with self.http.delete(url, headers=self.auth):
                pass

    async def _wait_live(self, ids: list[str]) -> None:
        deadline = time.monotonic() + LIVE_TIMEOUT_S
        while True:
            body = await self._json("GET", f"{self.session['url']}/outputs", 200, headers=self.auth)
            states = {o["id"]: o for o in body["outputs"] if o["id"] in ids}
            if all(o["state"] == "live" for o in states.values()):
                _print({"type": "present.outputs", "outputs": list(states.values())})
                return
            if time.monotonic() > deadline:
                raise PresentError(f"outputs not live within {LIVE_TIMEOUT_S:g} s: {list(states.values())}")
            await asyncio.sleep(POLL_S)

    async def _follow(self, url: str, report: dict) -> dict:
        """Poll the script until it ends, printing each change of its state and of its items' states."""
        seen: dict = {}
        while True:
            shown = {"state": report["state"], **{i["index"]: i["state"] for i in report["items"]}}
            if shown != seen:
                items = [i["state"] for i in report["items"]]
                state, current = report["state"], report["current"]
                _print({"type": "present.script", "state": state, "current": current, "items": items})
                seen = shown
            if report["state"] in ENDED:
                return report
            await asyncio.sleep(POLL_S)
            report = await self._json("GET", f"{url}/script", 200, headers=self.auth)


async def _present(args: argparse.Namespace, config: ServerConfig | None) -> int:
    script, files = load_script(Path(args.script))
    outputs = []
    for url in args.to:
        body: dict = {"url": url}
        if args.video_bitrate_kbps is not None:
            body["video_bitrate_kbps"] = args.video_bitrate_kbps
        if args.keyframe_interval_s is not None:
            body["keyframe_interval_s"] = args.keyframe_interval_s
        try:  # a bad URL or protocol is refused here, before a session (or the model) is opened for it
            OutputSettings.from_json(body)
        except ApiError as exc:
            raise PresentError(f"--to {url}: {exc.message}") from exc
        outputs.append(body)
    here = None  # the server run in this process (builds, starts and closes the engine), without --server
    try:
        if config is not None:
            here = InProcessServer(config, host="127.0.0.1", port=0)
            base = await here.start()
            keys = [config.api_key] if isinstance(config.api_key, str) else list(config.api_key or [])
        else:
            base, keys = args.server, list(args.api_key or [])
        api_key = keys[0] if keys else None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            presenter = Presenter(http, base, api_key)
            await presenter.wait_ready()
            report, final = await presenter.run(script, files, outputs, args.lead_in_s, args.tail_s)
    finally:
        if here is not None:
            await here.stop()
    done = {"type": "present.done", "script": report, "outputs": final}
    _print(done)
    if args.report:
        Path(args.report).write_text(json.dumps(done, indent=1))
    return 0 if report["state"] == "finished" else 2


def cmd_present(args: argparse.Namespace) -> int:
    config = None
    if not args.server:
        args.host, args.port = "127.0.0.1", 0
        try:
            config = ServerConfig.from_args(args, os.environ)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_present(args, config))
    except PresentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (aiohttp.ClientError, OSError) as exc:  # --server down, refused, or the connection dropped
        print(
            f"error: cannot reach the server at {args.server}: {exc} (is it running? check --server)", file=sys.stderr
        )
        return 2
