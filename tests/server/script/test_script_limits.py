"""Scripts, TTS and /speak under hostile use (issue 22, items 3, 4, 5 and 14), each over loopback HTTP against the
real server: TTS processes are killed and reaped however a script ends and are bounded for the whole server; a small
file that expands (a 192 kHz 7.1 FLAC of silence) costs the server little while it plays and nothing once its
session is gone; six slow POSTs race for one session's script slot; a text "{out}" is spoken as written.

The TTS command is a small Python script (tests/kit/fake_tts.py) that records the text it was given and sleeps or writes
a short WAV. Processes are counted from /proc by the script's path in their command line; memory is the server
process's VmRSS (/proc/<pid>/status). Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from kit.http_calls import bearer, create_session, delete_session
from kit.http_calls import http as open_http
from kit.media_synth import wav_of
from kit.netns_browser import start_serve, stop
from kit.paths import KIT
from kit.served import make_config
from kit.waits import free_port, run

from server.api.speak import AUDIO_DECODING

pytestmark = [pytest.mark.timeout(600)]

FAKE_TTS = KIT / "fake_tts.py"


def tts_processes() -> int:
    """Processes of tests/kit/fake_tts.py alive on this machine (zombies included: a child nobody reaped)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        count += str(FAKE_TTS).encode() in cmdline
    return count


def tts_command(mode: str, record_dir: Path) -> str:
    return f"{sys.executable} {FAKE_TTS} {mode} {record_dir} {{text}} {{out}}"


async def until(predicate, timeout: float, what: str, step: float = 0.05):
    """The predicate's first truthy value; AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def record_dir(tmp_path) -> Path:
    path = tmp_path / "tts-texts"
    path.mkdir()
    return path


# -- 3. TTS processes: killed and reaped on every exit path, bounded for the whole server ------------------------------
def test_stopped_scripts_leave_no_tts_processes(record_dir, serve):
    """10 rounds: a script whose text item runs a slow TTS command (it would sleep 120 s), ended while the command
    runs by DELETE of the script, its `stop` action or DELETE of the session. Before: each round left its process
    running (10 after 10 rounds)."""
    server = serve(tts_command=tts_command("slow", record_dir))
    ends = ("DELETE script", "stop", "DELETE session")

    async def main():
        counts = []
        async with open_http(60) as http:
            for round_ in range(10):
                session = await create_session(http, server.url)
                url, auth = f"{session['url']}/script", bearer(session["token"])
                async with http.post(url, json={"items": [{"text": f"round {round_}"}]}, headers=auth) as r:
                    assert r.status == 201, await r.text()
                await until(lambda n=round_: len(list(record_dir.iterdir())) > n, 30, "the TTS command to start")
                end = ends[round_ % 3]
                if end == "DELETE script":
                    async with http.delete(url, headers=auth) as r:
                        assert r.status == 200 and (await r.json())["state"] == "stopped"
                elif end == "stop":
                    async with http.post(f"{url}/stop", headers=auth) as r:
                        assert r.status == 200 and (await r.json())["state"] == "stopped"
                await delete_session(http, session)
                counts.append(tts_processes())
        left = tts_processes()
        try:
            await until(lambda: tts_processes() == 0, 5, "the TTS processes to be gone")
        finally:
            print(f"\nTTS processes after each round {counts}; {left} after 10 rounds, {tts_processes()} 5 s later")
        return counts

    counts = run(main(), 300)
    assert counts == [0] * 10  # gone (killed and reaped) by the time the stop, DELETE or close answered


def test_tts_processes_are_bounded_for_the_whole_server(record_dir, serve):
    """`--tts_max_procs 1`: while one script's TTS command runs, a script with a text item on another session gets
    503 + Retry-After (a script without one is not refused); the process count never passes 1."""
    config = make_config(tts_command=tts_command("slow", record_dir), tts_max_procs=1)
    server = serve(config=config)
    peak = [0]

    async def main():
        async with open_http(60) as http:
            first, second = await create_session(http, server.url), await create_session(http, server.url)
            async with http.post(
                f"{first['url']}/script", json={"items": [{"text": "one"}]}, headers=bearer(first["token"])
            ) as r:
                assert r.status == 201, await r.text()
            await until(lambda: any(record_dir.iterdir()), 30, "the first TTS command to start")
            replies = []
            for items in ([{"text": "two"}], [{"text": "three"}], [{"pause_s": 0.2}]):
                async with http.post(
                    f"{second['url']}/script", json={"items": items}, headers=bearer(second["token"])
                ) as r:
                    replies.append((r.status, r.headers.get("Retry-After"), await r.json()))
                peak[0] = max(peak[0], tts_processes())
                if r.status == 201:
                    async with http.delete(f"{second['url']}/script", headers=bearer(second["token"])) as r:
                        assert r.status == 200
            for session in (first, second):
                await delete_session(http, session)
            return replies

    replies = run(main(), 120)
    print(f"\nwith --tts_max_procs 1: {[(s, retry) for s, retry, _ in replies]}; at most {peak[0]} TTS processes")
    assert [(s, retry) for s, retry, _ in replies[:2]] == [(503, "5"), (503, "5")]
    assert replies[0][2]["error"]["code"] == "busy" and "--tts_max_procs" in replies[0][2]["error"]["message"]
    assert replies[2][0] == 201  # no text item, no TTS slot needed
    assert peak[0] == 1


# -- 14. a text is spoken as written: no placeholder in it is replaced ------------------------------------------------
def test_a_tts_text_is_passed_literally(record_dir, serve):
    """Before: the text "{out}" reached the command as the output file's path (two-pass substitution)."""
    server = serve(tts_command=tts_command("speak", record_dir))
    texts = ["{out}", "say {text} and {out}", "{{out}}"]

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, server.url)
            url, auth = f"{session['url']}/script", bearer(session["token"])
            async with http.post(url, json={"items": [{"text": t} for t in texts]}, headers=auth) as r:
                assert r.status == 201, await r.text()

            async def state() -> str:
                async with http.get(url, headers=auth) as r:
                    return (await r.json())["state"]

            end = time.monotonic() + 120
            while (final := await state()) in ("preparing", "playing") and time.monotonic() < end:
                await asyncio.sleep(0.2)
            await delete_session(http, session)
            return final

    final = run(main(), 180)
    received = [p.read_text() for p in sorted(record_dir.iterdir(), key=lambda p: int(p.stem))]
    print(f"\nsent {texts}, the TTS command received {received}; script {final}")
    assert final == "finished" and received == texts


# -- 5. one script per session, even when six POSTs race with slow bodies ---------------------------------------------
def test_six_concurrent_slow_posts_start_one_script(serve):
    """Six POSTs of a script to one session at once, each body trickling in over a second. Before: all six got 201
    (the check ran before the body was read) and the replaced runners kept running."""
    server = serve()
    body = json.dumps({"items": [{"pause_s": 5.0}, {"mark": "end"}]}).encode()

    async def slow_body():
        for start in range(0, len(body), 8):
            yield body[start : start + 8]
            await asyncio.sleep(1.0 / (len(body) / 8))

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, server.url)
            url = f"{session['url']}/script"
            headers = {**bearer(session["token"]), "Content-Type": "application/json"}

            async def post():
                async with http.post(url, data=slow_body(), headers=headers) as r:
                    return r.status, await r.json()

            replies = await asyncio.gather(*(post() for _ in range(6)))
            runners = [t.get_name() for t in asyncio.all_tasks(server.loop) if t.get_name().startswith("script-")]
            async with http.get(url, headers=bearer(session["token"])) as r:
                current = await r.json()
            await delete_session(http, session)
            return replies, runners, current

    replies, runners, current = run(main(), 120)
    statuses = sorted(status for status, _ in replies)
    print(f"\nsix slow POSTs: {statuses}; script tasks running {len(runners)}")
    assert statuses == [201] + [409] * 5
    assert all(reply["error"]["code"] == "conflict" for status, reply in replies if status == 409)
    created = next(reply for status, reply in replies if status == 201)
    assert current["id"] == created["id"] and current["state"] in ("preparing", "playing")
    assert len(runners) == 1


# -- 4. decoded audio: the engine's rate, mono, budgeted, released -----------------------------------------------------
def test_a_script_holds_its_items_within_its_byte_budget(serve):
    """`--script_audio_mb 0.5` (5.4 s of 48 kHz mono int16): two 3 s items do not fit at once, so the second is
    decoded after the first has played and both play; an 8 s item alone is larger than the budget and fails its
    script with the reason. The server's budget is all given back after each script."""
    server = serve(script_audio_mb=0.5)
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(3 * 16000) / 16000)).astype(np.float32)

    def form(items: list, files: dict[str, np.ndarray]) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("script", json.dumps({"items": items}))
        for name, samples in files.items():
            data.add_field(name, wav_of(samples), filename=f"{name}.wav", content_type="audio/wav")
        return data

    async def play(http, session, items, files) -> dict:
        url, auth = f"{session['url']}/script", bearer(session["token"])
        async with http.post(url, data=form(items, files), headers=auth) as r:
            assert r.status == 201, await r.text()
        end = time.monotonic() + 120
        while time.monotonic() < end:
            async with http.get(url, headers=auth) as r:
                report = await r.json()
            if report["state"] not in ("preparing", "playing"):
                return report
            await asyncio.sleep(0.2)
        raise AssertionError(f"the script did not end: {report}")

    async def main():
        async with open_http(180) as http:
            session = await create_session(http, server.url)
            two = await play(http, session, [{"audio": "a"}, {"audio": "b"}], {"a": tone, "b": tone})
            held_after_two = server.app[AUDIO_DECODING].budget.held
            big = await play(http, session, [{"audio": "c"}], {"c": np.tile(tone, 3)[: 8 * 16000]})
            held_after_big = server.app[AUDIO_DECODING].budget.held
            await delete_session(http, session)
            return two, big, held_after_two, held_after_big

    two, big, held_two, held_big = run(main(), 240)
    print(
        f"\n--script_audio_mb 0.5: two 3 s items {two['state']} {[i['state'] for i in two['items']]}; an 8 s item "
        f"{big['state']}: {big['error']}; server budget held after each {held_two}, {held_big} bytes"
    )
    assert two["state"] == "finished" and [i["state"] for i in two["items"]] == ["done", "done"]
    assert [i["duration_s"] for i in two["items"]] == [3.0, 3.0]
    assert big["state"] == "failed" and "--script_audio_mb" in big["error"]
    assert held_two == held_big == 0


def silent_flac(seconds: float, rate: int = 192000, layout: str = "7.1") -> bytes:
    """A FLAC of digital silence: a few hundred KB that decoded at its own rate and channels in float32 took 6 MB
    a second."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout=layout)
        stream.format = "s16"
        block = rate // 10
        zeros = np.zeros((1, block * 8), np.int16)
        for index in range(int(seconds * rate) // block):
            frame = av.AudioFrame.from_ndarray(zeros, format="s16", layout=layout)
            frame.sample_rate, frame.pts = rate, index * block
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """The highest VmRSS of a process, polled every 20 ms from a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return self.peak


async def trickle(data: bytes, seconds: float):
    for start in range(0, len(data), len(data) // 20 + 1):
        yield data[start : start + len(data) // 20 + 1]
        await asyncio.sleep(seconds / 20)


def test_expanding_audio_costs_little_and_is_freed_with_its_session(model_dir, tmp_path):
    """A 100 s FLAC of silence at 192 kHz 7.1 (about 40 KB) in three scripts, each on its own session that is
    deleted while the script plays, then said by /speak. The server (`vexpress-rt serve`, its own process) must stay
    within 300 MB of its baseline while it holds the audio and after the DELETEs. Before: each decode held 600 MiB
    at the file's own rate and channels, and after DELETE the server kept gigabytes (the runners stayed alive in a
    reference cycle through their cancelled task, and the allocator kept the native-rate chunks).
    With `--max_speak_decodes 1`, a /speak while another is being read gets 503 + Retry-After."""
    flac = silent_flac(100.0)
    port = free_port()
    proc = start_serve(model_dir, port, tmp_path / "serve.log", "--max_speak_decodes", "1")
    url = f"http://127.0.0.1:{port}"

    async def ready(http: aiohttp.ClientSession) -> None:
        end = time.monotonic() + 240
        while time.monotonic() < end:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        raise AssertionError("the server did not get ready within 240 s")

    async def main():
        async with open_http(300) as http:
            await ready(http)
            await asyncio.sleep(2)  # the engine's warm-up settles
            baseline = rss_mb(proc.pid)
            peak = PeakRss(proc.pid)
            states = []
            for _ in range(3):
                session = await create_session(http, url)
                auth = bearer(session["token"])
                form = aiohttp.FormData()
                form.add_field("script", json.dumps({"items": [{"audio": "a"}]}))
                form.add_field("a", flac, filename="a.flac", content_type="audio/flac")
                async with http.post(f"{session['url']}/script", data=form, headers=auth) as r:
                    assert r.status == 201, await r.text()
                end = time.monotonic() + 120
                while time.monotonic() < end:
                    async with http.get(f"{session['url']}/script", headers=auth) as r:
                        state = (await r.json())["state"]
                    if state != "preparing":
                        break
                    await asyncio.sleep(0.2)
                states.append(state)
                await delete_session(http, session)
            session = await create_session(http, url)
            auth = {**bearer(session["token"]), "Content-Type": "audio/flac"}
            speak_url = f"{session['url']}/speak"
            slow = asyncio.ensure_future(http.post(speak_url, data=trickle(flac, 2.0), headers=auth))
            await asyncio.sleep(0.5)
            async with http.post(speak_url, data=flac, headers=auth) as r:
                busy = (r.status, r.headers.get("Retry-After"))
            async with await slow as r:
                spoken = (r.status, await r.json())
            await delete_session(http, session)
            await asyncio.sleep(2)
            return baseline, peak.stop(), rss_mb(proc.pid), states, busy, spoken

    try:
        baseline, peak, after, states, busy, spoken = run(main(), 540)
    finally:
        stop(proc)
    print(
        f"\n192 kHz 7.1 FLAC of {len(flac) / 1024:.0f} KB, 100 s: server RSS baseline {baseline:.0f} MB, peak "
        f"{peak:.0f} MB (+{peak - baseline:.0f}), after the DELETEs {after:.0f} MB (+{after - baseline:.0f}); "
        f"scripts {states}; /speak {spoken[0]} {spoken[1]}, a second one meanwhile {busy}"
    )
    assert states == ["playing"] * 3
    assert spoken[0] == 202 and spoken[1]["sample_rate"] == 192000 and spoken[1]["channels"] == 8
    assert busy == (503, "5")
    assert peak - baseline < 300 and after - baseline < 300
