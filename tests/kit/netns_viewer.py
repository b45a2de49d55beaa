"""The chromeless viewer page in headless Chromium, inside a loopback-only network namespace; prints one JSON report.
Used by tests/server/webrtc/test_viewer.py, which starts it as

    unshare -n bash -c 'ip link set lo up; exec python tests/kit/netns_viewer.py ...'

Steps: `vexpress-rt serve` (tiny model, ICE on 127.0.0.1); a session made over the HTTP API, as a presenter's
script would; Chromium opens the session's view_url (its view-only token) with &bg=transparent (the page trickles
its candidates through PATCH); the video decodes; the audio level the page hears is measured while idle, then after
`POST .../speak` of a WAV; a screenshot without the page background shows alpha 0 outside the portrait and an
opaque portrait; a second page with bg=00ff00 shows the key colour there; navigating away DELETEs the viewer's
resource. Every step has a deadline; the whole run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import time
import urllib.request
from pathlib import Path

from kit.netns_browser import chromium_pages, report_bounded, served_for_driver

VIEWPORT = {"width": 320, "height": 240}  # the portrait fills rows 40-199; rows 0-39 and 200-239 are outside it


def api(method: str, url: str, token: str | None = None, body: bytes | None = None, ctype: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if ctype:
        headers["Content-Type"] = ctype
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
        return resp.status, json.loads(text) if text else None


def pixel(png: bytes, x: int, y: int) -> list[int]:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGBA")
    return list(image.getpixel((x, y)))


def wait_playing(page, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = page.evaluate("window.vexview.stats()")
        if (s.get("video") or {}).get("framesDecoded") and (s.get("audio") or {}).get("totalSamplesReceived"):
            return s
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no frame and audio within {timeout_s} s: {s}, {page.evaluate('window.vexview.lastError')}"
            )
        time.sleep(0.1)


def peak_level(page, seconds: float) -> float:
    peak, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, page.evaluate("window.vexview.level()"))
        time.sleep(0.03)
    return peak


def run(args: argparse.Namespace, report: dict) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    with served_for_driver(args.model_dir, work, report) as base:
        _, session = api("POST", f"{base}/v1/sessions", body=b"{}", ctype="application/json")
        sid, token = session["id"], session["token"]
        report["session_id"] = sid

        with chromium_pages(report) as new_page:
            page = new_page(viewport=VIEWPORT)
            page.goto(f"{session['view_url']}&bg=transparent", wait_until="load", timeout=15_000)  # the view token
            page.wait_for_function("window.vexview !== undefined", timeout=5_000)
            page.wait_for_function("window.vexview.lastError || window.vexview.state === 'playing'", timeout=30_000)
            report["state"] = page.evaluate("window.vexview.state")
            report["last_error"] = page.evaluate("window.vexview.lastError")
            if report["last_error"]:
                return
            s0 = wait_playing(page, 15)
            report["patches"] = page.evaluate("window.vexview.patches")
            report["trickled_candidates"] = page.evaluate("window.vexview.candidates")
            report["controls"] = page.evaluate("document.querySelector('video').controls")
            report["muted"] = page.evaluate("document.querySelector('video').muted")
            report["paused"] = page.evaluate("document.querySelector('video').paused")
            report["idle_level_peak_rms"] = round(peak_level(page, 1.5), 5)
            wav = Path(args.wav).read_bytes()
            status, said = api("POST", f"{base}/v1/sessions/{sid}/speak", token, wav, "audio/wav")
            report["speak"] = [status, said]
            report["speech_level_peak_rms"] = round(peak_level(page, args.measure_s), 5)
            s1 = page.evaluate("window.vexview.stats()")
            seconds = (s1["time"] - s0["time"]) / 1000
            report["fps"] = round((s1["video"]["framesDecoded"] - s0["video"]["framesDecoded"]) / seconds, 2)
            report["frame_size"] = [s1["video"]["frameWidth"], s1["video"]["frameHeight"]]
            report["audio_samples_per_s"] = round(
                (s1["audio"]["totalSamplesReceived"] - s0["audio"]["totalSamplesReceived"]) / seconds
            )
            report["pair"] = s1["pair"]
            _, info = api("GET", f"{base}/v1/sessions/{sid}", token)
            report["peers_while_playing"] = info["peers"]

            shot = page.screenshot(omit_background=True)
            (work / "view_transparent.png").write_bytes(shot)
            report["transparent_outside_rgba"] = [pixel(shot, 160, 10), pixel(shot, 160, 230)]
            report["transparent_portrait_rgba"] = pixel(shot, 160, 120)

            keyed = new_page("keyed", viewport=VIEWPORT)
            keyed.goto(f"{session['view_url']}&bg=00ff00", wait_until="load", timeout=15_000)
            keyed.wait_for_function("window.vexview.state === 'playing'", timeout=30_000)
            wait_playing(keyed, 15)
            keyed.wait_for_timeout(500)
            shot = keyed.screenshot()
            (work / "view_key.png").write_bytes(shot)
            report["key_outside_rgba"] = [pixel(shot, 160, 10), pixel(shot, 160, 230)]
            report["key_portrait_rgba"] = pixel(shot, 160, 120)
            keyed.close()

            # The server ends this viewer (its resource DELETEd by someone else): the page notices the stream
            # stopped and connects again, as an OBS source should.
            first = page.evaluate("window.vexview.resource")
            api("DELETE", first, token)
            t_cut = time.monotonic()
            page.wait_for_function(
                f"window.vexview.resource && window.vexview.resource !== {json.dumps(first)}"
                " && window.vexview.state === 'playing'",
                timeout=30_000,
            )
            wait_playing(page, 15)
            report["reconnected_s"] = round(time.monotonic() - t_cut, 2)

            page.goto("about:blank")  # pagehide: the page DELETEs its resource (keepalive fetch)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                _, info = api("GET", f"{base}/v1/sessions/{sid}", token)
                if not info["peers"]:
                    break
                time.sleep(0.2)
            report["peers_after_leaving"] = info["peers"]
        api("DELETE", f"{base}/v1/sessions/{sid}", token)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--wav", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--measure-s", type=float, default=4.0)
    ap.add_argument("--timeout", type=int, default=120, help="the whole run; then the server is stopped")
    args = ap.parse_args()
    return report_bounded("netns_viewer", args.timeout, lambda report: run(args, report), {})


if __name__ == "__main__":
    sys.exit(main())
