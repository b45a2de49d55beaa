"""Live outputs (server/outputs/): a session pushed to a real RTMP ingest on loopback (FFmpeg's RTMP server through
PyAV, in a process of its own, recording what it receives), and to an aiortc WHIP endpoint run by the test.

A/V offset, measured from what the ingest recorded: the server runs with `--mark_frames`, so every video frame
carries its engine index as a barcode and the audio of every 25th frame starts with a chirp. For each chirp found
in the recorded audio (matched filter), offset = its time - the pts of the video frame whose barcode names that
frame; a player shows exactly this offset. Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from kit.http_calls import bearer, create_session, delete_session
from kit.http_calls import http as open_http
from kit.media_synth import FPS, loud_seconds, wav_of
from kit.rtmp_receiver import RtmpIngest, read_received
from kit.served import server_fixture
from kit.waits import free_port, run
from kit.whip_receiver import WhipReceiver

from server.outputs.ingest import encode_spec
from server.outputs.target import OutputSettings, protocol_available

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(240)]

AV_OFFSET_MS = 80  # the bound (the project's target is one frame, 40 ms)


server = server_fixture({"mark_frames": True, "output_allow": ["127.0.0.1"]})


def _counter(metrics_text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in metrics_text.splitlines() if line.startswith(name + " ")))


async def output_report(http, session: dict, output_id: str) -> dict:
    async with http.get(session["url"], headers=bearer(session["token"])) as r:
        assert r.status == 200
        return next(o for o in (await r.json())["outputs"] if o["id"] == output_id)


async def wait_output(http, session: dict, output_id: str, state: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = await output_report(http, session, output_id)
        if report["state"] == state or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.1)


async def add_live_output(http, session: dict, body: dict) -> tuple[dict, str, dict]:
    """POST an output and wait (bounded) until it is live: (the created report, its Location, the live report)."""
    async with http.post(f"{session['url']}/outputs", json=body, headers=bearer(session["token"])) as r:
        assert r.status == 201, await r.text()
        created = await r.json()
        location = r.headers["Location"]
    return created, location, await wait_output(http, session, created["id"], "live", 30)


async def speak(http, session: dict, samples: np.ndarray) -> None:
    headers = {**bearer(session["token"]), "Content-Type": "audio/wav"}
    async with http.post(session["speak_url"], data=wav_of(samples), headers=headers) as r:
        assert r.status == 202, await r.text()


async def wait_quiet(server, session: dict, timeout: float = 60) -> None:
    """Until the session played all it was given."""
    es = server.state.sessions.get(session["id"]).engine_session
    deadline = time.monotonic() + timeout
    await asyncio.sleep(0.3)
    while (es.buffered_ms > 0 or es.state.value == "speaking") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def test_the_default_video_bitrate_follows_the_frame_size():
    """No `video_bitrate_kbps`: 2500 kbps up to 1280x720 (the crop, as before), more for a framed 1080p presenter
    (docs/framing.md), inside the ingests' 1080p range; a bitrate given is kept whatever the size."""
    default = OutputSettings.from_json({"url": "rtmp://127.0.0.1/live/key"})
    given = OutputSettings.from_json({"url": "rtmp://127.0.0.1/live/key", "video_bitrate_kbps": 800})
    assert encode_spec(default, FPS, 512, 512).video_bit_rate == 2_500_000
    assert encode_spec(default, FPS, 1280, 720).video_bit_rate == 2_500_000
    assert 4_500_000 <= encode_spec(default, FPS, 1920, 1080).video_bit_rate <= 6_000_000
    assert encode_spec(given, FPS, 1920, 1080).video_bit_rate == 800_000


def test_rtmp_push_reaches_the_ingest_in_sync_and_survives_its_restart(server, tiny_speech, tmp_path):
    port = free_port()
    first = RtmpIngest(port, tmp_path / "first.flv")
    second: RtmpIngest | None = None

    async def main():
        nonlocal second
        async with open_http(60) as http:
            session = await create_session(http, server.url)
            body = {"url": first.url, "video_bitrate_kbps": 800, "keyframe_interval_s": 1}
            created, location, live = await add_live_output(http, session, body)
            await asyncio.sleep(0.5)
            await speak(http, session, tiny_speech)
            await wait_quiet(server, session)
            await asyncio.sleep(0.6)
            before = await output_report(http, session, created["id"])
            async with http.get(f"{server.url}/metrics") as r:
                metrics_text = await r.text()
            # the ingest dies mid-stream; the session goes on; the output reconnects to the new one
            pump = server.state.sessions.get(session["id"]).pump
            frames_at_kill = pump.frames
            first.kill()
            dropped = await wait_output(http, session, created["id"], "reconnecting", 15)
            second = RtmpIngest(port, tmp_path / "second.flv")
            back = await wait_output(http, session, created["id"], "live", 40)
            await asyncio.sleep(0.5)
            await speak(http, session, tiny_speech)
            await wait_quiet(server, session)
            await asyncio.sleep(0.6)
            frames_after = pump.frames
            state_after = server.state.sessions.get(session["id"]).engine_session.state.value
            async with http.delete(f"{server.url}{location}", headers=bearer(session["token"])) as r:
                assert r.status == 200
                final = await r.json()
            await delete_session(http, session)
            async with http.get(f"{server.url}/metrics") as r:
                metrics_after = await r.text()
            return (
                created,
                live,
                before,
                metrics_text,
                dropped,
                back,
                final,
                frames_at_kill,
                frames_after,
                state_after,
                (metrics_after),
            )

    created, live, before, metrics_text, dropped, back, final, frames_at_kill, frames_after, state_after, after = run(
        main(), 200
    )
    # the counters keep the frames of the output that was deleted: a counter never goes down
    sent_before, sent_after = (_counter(m, "vexpress_output_frames_sent_total") for m in (metrics_text, after))
    assert 0 < sent_before <= sent_after, (sent_before, sent_after)
    assert second is not None
    second.finish()
    got1, got2 = read_received(first.path), read_received(second.path)
    offsets1, offsets2 = got1.av_offsets_ms(), got2.av_offsets_ms()
    speech_s = len(tiny_speech) / 16000
    loud_src = loud_seconds(tiny_speech, 16000)
    loud1, loud2 = loud_seconds(got1.audio, got1.audio_rate), loud_seconds(got2.audio, got2.audio_rate)
    print(
        f"\nRTMP first ingest: {got1.codecs} {got1.size}, {len(got1.video_times)} frames ({got1.fps:.2f} fps, "
        f"{got1.missing()} missing, {got1.missing(0.5)} after 0.5 s, "
        f"video {got1.video_s:.2f} s, audio {got1.audio_s:.2f} s), A/V offsets {np.round(offsets1, 1).tolist()} ms, "
        f"loud {loud1:.2f} s (source {loud_src:.2f} s of {speech_s:.2f} s), keyframes at "
        f"{np.round(got1.keyframe_times, 2).tolist()} s\n"
        f"second ingest (after the kill): {len(got2.video_times)} frames ({got2.fps:.2f} fps), A/V offsets "
        f"{np.round(offsets2, 1).tolist()} ms, loud {loud2:.2f} s\n"
        f"reports: live {live['state']} -> before kill {before} -> {dropped['state']} -> {back['state']}; "
        f"final {final}"
    )
    assert created["url"].endswith("/…") and "stream-key" not in str(final)  # the stream key is never shown
    assert live["state"] == "live" and 0 < before["bitrate_kbps"] < 2 * 800 and before["frames_sent"] > 0
    # keyframe_interval_s: a keyframe every 25 encoded frames (counted in frames: a frame the session itself skipped
    # on a starved CPU never reaches the encoder)
    positions = np.searchsorted(got1.video_times, got1.keyframe_times)
    assert len(positions) >= 3 and set(np.diff(positions).tolist()) == {FPS}
    assert 'vexpress_outputs{kind="rtmp",state="live"} 1.0' in metrics_text
    assert "vexpress_output_bitrate_bps{" in metrics_text
    for got, offsets, loud in ((got1, offsets1, loud1), (got2, offsets2, loud2)):
        assert got.codecs == ("h264", "aac") and got.size == (128, 64)
        # no gap but for frames the output counted as dropped (its encoder 2 s behind on a loaded CPU)
        assert abs(got.fps - FPS) < 0.5 and got.missing() <= final["frames_dropped"]
        assert abs(got.audio_s - got.video_s) < 0.1
        assert len(offsets) >= 2 and max(abs(o) for o in offsets) < AV_OFFSET_MS
        assert loud >= 0.8 * loud_src  # the speech arrived
    # the kill: noticed, reconnected, the session unharmed (its frames went on meanwhile, it is still served)
    assert dropped["state"] == "reconnecting" and back["state"] == "live"
    assert final["reconnects"] >= 1 and final["connects"] == 2
    assert frames_after - frames_at_kill >= 2 * FPS and state_after in ("idle", "speaking")


def test_whip_publish_reaches_an_aiortc_whip_endpoint(server, tiny_speech):
    async def main():
        receiver = await WhipReceiver(token="whip-secret").start()
        try:
            async with open_http(60) as http:
                session = await create_session(http, server.url)
                body = {"url": "whip+" + receiver.url, "token": "whip-secret"}
                created, location, live = await add_live_output(http, session, body)
                await asyncio.sleep(0.5)
                await speak(http, session, tiny_speech)
                await wait_quiet(server, session)
                await asyncio.sleep(1.0)
                report = await output_report(http, session, created["id"])
                async with http.delete(f"{server.url}{location}", headers=bearer(session["token"])) as r:
                    assert r.status == 200
                    final = await r.json()
                await asyncio.sleep(0.3)
                await delete_session(http, session)
            return live, report, final, receiver
        finally:
            await receiver.close()

    live, report, final, receiver = run(main(), 150)
    times = np.asarray(receiver.video_times)
    video_s = times[-1] - times[0] + 1 / FPS if len(times) > 1 else 0.0
    fps = 1 / np.median(np.diff(times)) if len(times) > 2 else 0.0
    audio_s = len(receiver.audio) / receiver.audio_rate
    loud, loud_src = loud_seconds(receiver.audio, receiver.audio_rate), loud_seconds(tiny_speech, 16000)
    print(
        f"\nWHIP: {receiver.posts} POST, {receiver.deletes} DELETE; {len(times)} frames ({fps:.2f} fps, video "
        f"{video_s:.2f} s), audio {audio_s:.2f} s, loud {loud:.2f} s (source {loud_src:.2f} s)\nreport {report}"
    )
    assert live["state"] == "live" and report["bitrate_kbps"] > 0 and report["frames_sent"] > 0
    assert receiver.posts == 1 and receiver.deletes == 1 and final["state"] == "stopped"
    assert abs(fps - FPS) < 1 and video_s > 2.0
    assert abs(audio_s - video_s) < 0.5  # both tracks ran the whole time
    assert loud >= 0.8 * loud_src  # the speech arrived


def test_outputs_are_validated_and_an_unreachable_ingest_harms_nobody(server):
    dead = f"rtmp://127.0.0.1:{free_port()}/live/secret-key"  # nobody listens there

    async def main():
        async with open_http(60) as http:
            refused = {}
            for name, body in {
                "srt": {"url": "srt://127.0.0.1:9000"},
                "scheme": {"url": "ftp://127.0.0.1/x"},
                "no host": {"url": "rtmp:///live/x"},
                "field": {"url": dead, "crf": 3},
                "bitrate": {"url": dead, "video_bitrate_kbps": 10**7},
            }.items():
                async with http.post(f"{server.url}/v1/sessions", json={"outputs": [body]}) as r:
                    refused[name] = (r.status, (await r.json())["error"])
            sessions_after_refusals = len(server.state.sessions)
            session = await create_session(http, server.url, {"outputs": [{"url": dead}]})
            pump = server.state.sessions.get(session["id"]).pump
            await asyncio.sleep(3.5)
            report = await output_report(http, session, session["outputs"][0]["id"])
            frames = pump.frames
            async with http.get(f"{server.url}/metrics") as r:
                metrics_text = await r.text()
            await delete_session(http, session)
            return refused, sessions_after_refusals, session, report, frames, metrics_text

    refused, open_after, session, report, frames, metrics_text = run(main())
    print(f"\nrefused: {refused}\nunreachable: {report} after {frames} frames")
    srt_missing = not protocol_available("srt")
    assert refused["srt"][0] == (400 if srt_missing else 201)
    if srt_missing:
        assert refused["srt"][1]["code"] == "unsupported_protocol" and "libsrt" in refused["srt"][1]["message"]
    assert all(status == 400 for name, (status, _) in refused.items() if name != "srt")
    assert open_after == 0  # a refused output opens no session
    assert session["outputs"][0]["state"] in ("connecting", "reconnecting")
    assert report["state"] == "reconnecting" and report["reconnects"] >= 1 and report["connects"] == 0
    assert "secret-key" not in str(report) and "secret-key" not in metrics_text
    assert frames >= 2.5 * FPS  # the session's clock went on: the dead ingest stalled nothing
    assert "vexpress_output_reconnects_total" in metrics_text
