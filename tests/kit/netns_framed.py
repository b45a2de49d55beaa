"""Presenter framing in headless Chromium, inside a loopback-only network namespace; prints one JSON report. Used by
tests/web_client/test_framed_browser.py, which starts it as

    unshare -n bash -c 'ip link set lo up; exec python tests/kit/netns_framed.py ...'

Steps: `vexpress-rt serve` (tiny model, 128x64 crops, ICE on 127.0.0.1); Chromium with a fake microphone playing a
WAV opens the page (`/?loopback=1`), uploads the presenter photo with its key points, picks Options > Framing
"The photo in 1280x720" and clicks Start, as a user does; after a warm-up it watches the <video> for --measure-s
seconds (requestVideoFrameCallback: every frame handed to the compositor, its size; getVideoPlaybackQuality;
getStats' framesDecoded, as tests/web_client/test_browser.py counts) and grabs frames into a canvas (PNG files in
the workdir). Then Stop, a session over the API with the key colour #00ff00 behind the person, and the OBS viewer
page at its view_url + &key=00ff00&bg=transparent: the canvas that page draws is saved as a PNG (with its alpha).
The test asserts on the report and the files. Every step has a deadline; the whole run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import time
from pathlib import Path

from kit.netns_browser import chromium_pages, report_bounded, served_for_driver
from kit.netns_viewer import api

FRAMING = "1280x720"
KEY = "#00ff00"

# Watch the page's <video> for `seconds`: one requestVideoFrameCallback per frame presented (its metadata says the
# frame's size and the compositor's count of presented frames), getVideoPlaybackQuality before and after, and the
# loudest the avatar's voice was meanwhile (the page's WebAudio analyser on the remote stream, read at each frame).
WATCH_JS = """async (seconds) => {
  const video = document.getElementById("avatar");
  const q0 = video.getVideoPlaybackQuality();
  const t0 = performance.now();
  const sizes = {};
  let calls = 0, first = null, last = null, peak = 0;
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, seconds * 1000 + 5000);  // bounded even if no frame comes
    const onFrame = (now, meta) => {
      calls += 1;
      peak = Math.max(peak, window.vexpress.remoteLevel());
      const size = `${meta.width}x${meta.height}`;
      sizes[size] = (sizes[size] || 0) + 1;
      if (first === null) first = meta;
      last = meta;
      if (performance.now() - t0 < seconds * 1000) video.requestVideoFrameCallback(onFrame);
      else { clearTimeout(timer); resolve(); }
    };
    video.requestVideoFrameCallback(onFrame);
  });
  const q1 = video.getVideoPlaybackQuality();
  const span = first && last ? (last.expectedDisplayTime - first.expectedDisplayTime) / 1000 : 0;
  return {
    seconds: (performance.now() - t0) / 1000, callbacks: calls, sizes,
    presented: first && last ? last.presentedFrames - first.presentedFrames : 0, presented_span_s: span,
    quality_frames: q1.totalVideoFrames - q0.totalVideoFrames,
    quality_dropped: q1.droppedVideoFrames - q0.droppedVideoFrames,
    video_size: [video.videoWidth, video.videoHeight], remote_level_peak: peak,
  };
}"""

# The frame the <video> shows now, drawn into a canvas of the video's own size, as a PNG data URL.
GRAB_JS = """() => {
  const video = document.getElementById("avatar");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/png");
}"""


def save_data_url(url: str, path: Path) -> str:
    path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    return path.name


def stats(page) -> dict:
    return page.evaluate("window.vexpress.stats()")


def run(args: argparse.Namespace, report: dict) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    with served_for_driver(args.model_dir, work, report) as base:
        with chromium_pages(report, args.wav) as new_page:
            page = new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"{base}/?loopback=1", wait_until="load", timeout=15_000)
            page.wait_for_function("window.vexpress !== undefined", timeout=5_000)

            # The presenter's photo, uploaded through the page with its key points (the fixtures have no face
            # detector models; the test found them as the server's own cascade would).
            t0 = time.monotonic()
            page.fill("#avatar-kps", args.kps)
            page.set_input_files("#avatar-file", args.photo)
            page.wait_for_function(
                "window.vexpress.lastError || document.getElementById('avatar-select').value !== ''",
                timeout=60_000,
            )
            report["upload_s"] = round(time.monotonic() - t0, 2)
            report["last_error"] = page.evaluate("window.vexpress.lastError")
            if report["last_error"]:
                return
            avatar_id = page.evaluate("document.getElementById('avatar-select').value")
            report["avatar_id"] = avatar_id

            page.click("summary:has-text('Options')")  # the options are folded away
            page.select_option("#framing", label="The photo in 1280x720")
            page.click("#start")
            page.wait_for_function(
                "window.vexpress.lastError || window.vexpress.pc?.connectionState === 'connected'",
                timeout=30_000,
            )
            report["last_error"] = page.evaluate("window.vexpress.lastError")
            if report["last_error"]:
                return
            session = page.evaluate("window.vexpress.session")
            report["session"] = {k: session.get(k) for k in ("id", "avatar_id", "fps", "width", "height")}
            _, info = api("GET", session["url"], session["token"])
            report["session"].update(framing=info.get("framing"), background=info.get("background"))

            deadline = time.monotonic() + 15
            while True:
                s0 = stats(page)
                if (s0.get("video") or {}).get("framesDecoded") and (s0.get("audio") or {}).get("totalSamplesReceived"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no frame or audio decoded within 15 s: {s0}")
                time.sleep(0.1)
            page.wait_for_timeout(args.warmup_s * 1000)
            s0 = stats(page)
            report["watch"] = page.evaluate(WATCH_JS, args.measure_s)
            s1 = stats(page)
            seconds = (s1["time"] - s0["time"]) / 1000
            v0, v1 = s0["video"], s1["video"]
            decoded = v1["framesDecoded"] - v0["framesDecoded"]
            report["decoded_fps"] = round(decoded / seconds, 2)
            received = (v1.get("framesReceived") or 0) - (v0.get("framesReceived") or 0)
            report["received_fps"] = round(received / seconds, 2)
            report["dropped_frames"] = (v1.get("framesDropped") or 0) - (v0.get("framesDropped") or 0)
            decode_s = (v1.get("totalDecodeTime") or 0) - (v0.get("totalDecodeTime") or 0)
            report["decode_ms_per_frame"] = round(1000 * decode_s / max(decoded, 1), 2)
            report["stats_frame_size"] = [s1["video"]["frameWidth"], s1["video"]["frameHeight"]]
            report["codec"] = s1["video"].get("codec")
            report["pair"] = s1.get("pair")
            report["frames"] = []
            for i in range(args.grabs):
                report["frames"].append(save_data_url(page.evaluate(GRAB_JS), work / f"frame{i}.png"))
                page.wait_for_timeout(300)
            page.screenshot(path=str(work / "page.png"))
            page.click("#stop")
            page.wait_for_function("window.vexpress.state === 'idle'", timeout=10_000)
            report["page_last_error"] = page.evaluate("window.vexpress.lastError")

            if args.keyed:
                body = json.dumps({"avatar_id": avatar_id, "framing": FRAMING, "background": KEY}).encode()
                _, keyed_session = api("POST", f"{base}/v1/sessions", body=body, ctype="application/json")
                report["keyed_session"] = {
                    k: keyed_session.get(k) for k in ("id", "width", "height", "framing", "background")
                }
                viewer = new_page("viewer", viewport={"width": 640, "height": 360})
                viewer.goto(f"{keyed_session['view_url']}&key=00ff00&bg=transparent", wait_until="load")
                viewer.wait_for_function("window.vexview !== undefined", timeout=5_000)
                viewer.wait_for_function(
                    "window.vexview.lastError || (window.vexview.state === 'playing'"
                    " && document.getElementById('keyed')?.width > 0)",
                    timeout=30_000,
                )
                report["viewer_last_error"] = viewer.evaluate("window.vexview.lastError")
                if report["viewer_last_error"]:
                    return
                viewer.wait_for_timeout(args.warmup_s * 1000)
                canvas = viewer.evaluate("document.getElementById('keyed').toDataURL('image/png')")
                report["keyed_frame"] = save_data_url(canvas, work / "keyed.png")
                viewer.close()
                api("DELETE", f"{base}/v1/sessions/{keyed_session['id']}", keyed_session["token"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--wav", required=True)
    ap.add_argument("--photo", required=True, help="the presenter's photo (PNG)")
    ap.add_argument("--kps", required=True, help="its eye, eye, nose points as JSON, in the photo's pixels")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--measure-s", type=float, default=4.0)
    ap.add_argument("--grabs", type=int, default=3, help="frames grabbed into a canvas, 0.3 s apart")
    ap.add_argument("--keyed", action="store_true", help="also the OBS viewer page on a key-colour session")
    ap.add_argument("--timeout", type=int, default=120, help="the whole run; then the server is stopped")
    args = ap.parse_args()
    return report_bounded("netns_framed", args.timeout, lambda report: run(args, report), {})


if __name__ == "__main__":
    sys.exit(main())
