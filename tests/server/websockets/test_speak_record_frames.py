"""Speak-a-file, MP4 recording and the frames websocket, with real clients over loopback (tiny model, CPU).

Like tests/server/websockets/test_bot_ws.py, nothing here depends on the tiny model keeping up with real time.
Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
import wave
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from kit.http_calls import avatar_form, create_session, delete_session
from kit.http_calls import http as open_http
from kit.media_synth import FPS, OUT_RATE, SPF, pcm16
from kit.served import server_fixture
from kit.waits import run
from kit.ws_clients import Bot, Frames
from PIL import Image
from skimage.data import astronaut

from server.websockets.frames import HEADER, parse_frame
from streaming.portrait import detect_face_kps
from vexpress_rt.media import resample_pcm

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def recording_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recordings")


server = server_fixture(lambda request: {"recording_dir": str(request.getfixturevalue("recording_dir"))})


def auth(session: dict) -> dict:
    return {"Authorization": f"Bearer {session['token']}"}


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """float (n,) or (n, channels) -> a PCM16 WAV file."""
    samples = samples if samples.ndim == 2 else samples[:, None]
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16(samples))
    return out.getvalue()


def encoded_bytes(samples: np.ndarray, rate: int, fmt: str, codec: str) -> bytes:
    """mono float -> a compressed file in memory (MP3, OGG/Opus...)."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        size = 1152
        for start in range(0, len(samples), size):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[None, start : start + size]), format="flt", layout="mono"
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def video_only_mp4() -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def test_speak_files(server, tiny_speech):
    speech44 = resample_pcm(np.stack([tiny_speech, tiny_speech]), 16000, 44100).T  # stereo 44.1 kHz
    files = {
        "wav": (wav_bytes(speech44, 44100), "audio/wav"),
        "mp3": (
            encoded_bytes(resample_pcm(tiny_speech[None], 16000, 22050)[0], 22050, "mp3", "libmp3lame"),
            "audio/mpeg",
        ),
        "ogg": (encoded_bytes(resample_pcm(tiny_speech[None], 16000, 48000)[0], 48000, "ogg", "libopus"), "audio/ogg"),
    }

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, server.url)
            url = session["speak_url"]
            bot = await Bot.connect(http, session)
            await bot.wait_type("session.ready")
            replies = {}
            wav_headers = {**auth(session), "Content-Type": "audio/wav"}
            async with http.post(url, data=files["wav"][0], headers=wav_headers) as r:
                replies["wav"] = (r.status, await r.json())
            finished = await bot.wait_type("playback.finished", timeout=60)
            for name in ("mp3", "ogg"):
                data, ctype = files[name]
                async with http.post(url, data=data, headers={**auth(session), "Content-Type": ctype}) as r:
                    replies[name] = (r.status, await r.json())
            form = aiohttp.FormData()
            form.add_field("audio", files["wav"][0], filename="speech.wav", content_type="audio/wav")
            async with http.post(url, data=form, headers=auth(session)) as r:
                replies["multipart"] = (r.status, await r.json())
            await bot.send({"type": "interrupt"})
            bad = {}
            cases = {
                "garbage": (b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 50, "audio/wav"),
                "empty": (b"", "audio/wav"),
                "json": (b'{"audio": 1}', "application/json"),
                "text": (b"hello", "text/plain"),
                "no_audio_stream": (video_only_mp4(), "video/mp4"),
                "too_big": (b"\0" * (26 * 2**20), "audio/wav"),
            }
            for name, (data, ctype) in cases.items():
                async with http.post(url, data=data, headers={**auth(session), "Content-Type": ctype}) as r:
                    bad[name] = (r.status, (await r.json())["error"])
            async with http.post(url, data=files["wav"][0], headers={"Content-Type": "audio/wav"}) as r:
                bad["no_token"] = (r.status, None)
            await bot.close()
            await delete_session(http, session)
            return replies, finished, bad

    replies, finished, bad = run(main())
    refused = {k: (s, e and e["code"]) for k, (s, e) in bad.items()}
    print(f"\nspeak: {replies}\nfinished {finished}\nrefused: {refused}")
    for name, (status, body) in replies.items():
        assert status == 202, (name, body)
        assert abs(body["utterance_ms"] - 1300) <= 30, (name, body)  # lossy codecs pad a little
    assert (replies["wav"][1]["sample_rate"], replies["wav"][1]["channels"]) == (44100, 2)
    assert (replies["mp3"][1]["sample_rate"], replies["ogg"][1]["sample_rate"]) == (22050, 48000)
    assert finished["interrupted"] is False and abs(finished["position_ms"] - 1300) <= 1000 / FPS
    expected = {
        "garbage": 400,
        "empty": 400,
        "json": 415,
        "text": 415,
        "no_audio_stream": 415,
        "too_big": 413,
        "no_token": 401,
    }
    assert {k: s for k, (s, _) in bad.items()} == expected
    assert all(e["message"] for k, (_, e) in bad.items() if e)


def _mp4_facts(data: bytes) -> dict:
    with av.open(io.BytesIO(data)) as container:
        v, a = container.streams.video[0], container.streams.audio[0]
        facts = {
            "video_codec": v.codec_context.name,
            "audio_codec": a.codec_context.name,
            "size": (v.width, v.height),
            "container_s": container.duration / 1e6,
        }
        frames, audio, rate = [], [], a.rate
        for frame in container.decode(v, a):
            if isinstance(frame, av.VideoFrame):
                frames.append(float(frame.pts * frame.time_base))
            else:
                audio.append(frame.to_ndarray().reshape(-1))
    pcm = np.concatenate(audio)
    facts.update(
        video_frames=len(frames),
        video_s=frames[-1] + 1 / FPS - frames[0],
        audio=pcm,
        audio_rate=rate,
        audio_s=len(pcm) / rate,
    )
    return facts


def _loud_blocks(x: np.ndarray, rate: int, threshold: float = 0.02) -> int:
    """How many 20 ms blocks of `x` are louder than `threshold` RMS."""
    n = rate // 50
    blocks = x[: len(x) // n * n].reshape(-1, n).astype(np.float64)
    return int((np.sqrt((blocks**2).mean(axis=1)) > threshold).sum())


def test_recording_from_creation_lasts_speech_plus_idle(server, tiny_speech):
    async def main():
        async with open_http(60) as http:
            session = await create_session(http, server.url, {"record": True})
            url = session["recording_url"]
            bot = await Bot.connect(http, session)
            await bot.wait_type("session.ready")
            await asyncio.sleep(0.5)  # idle before
            await bot.push(tiny_speech)
            await bot.send({"type": "audio.end"})
            await bot.wait_type("playback.finished", timeout=60)
            await asyncio.sleep(0.5)  # idle after
            async with http.get(url, headers=auth(session)) as r:
                while_recording = r.status
            async with http.delete(url, headers=auth(session)) as r:
                assert r.status == 200, await r.text()
                summary = await r.json()
            async with http.get(url, headers=auth(session)) as r:
                assert r.status == 200, await r.text()
                content_type, data = r.headers["Content-Type"], await r.read()
            underruns = server.state.sessions.get(session["id"]).engine_session.underruns
            # recording again, started by request, stopped by the end of the session
            async with http.post(url, headers=auth(session)) as r:
                restarted = r.status
            async with http.post(url, headers=auth(session)) as r:
                twice = r.status
            await asyncio.sleep(0.6)
            await bot.close()
            await delete_session(http, session)
            async with http.get(url, headers=auth(session)) as r:  # the session is gone; its recording is not
                assert r.status == 200, await r.text()
                second = await r.read()
            async with http.get(url, headers={"Authorization": "Bearer nope"}) as r:
                wrong_token = r.status
            return (
                session,
                summary,
                while_recording,
                content_type,
                data,
                underruns,
                restarted,
                twice,
                second,
                wrong_token,
            )

    session, summary, while_recording, content_type, data, underruns, restarted, twice, second, wrong = run(main())
    facts = _mp4_facts(data)
    later = _mp4_facts(second)
    speech_48k = resample_pcm(tiny_speech[None], 16000, OUT_RATE)[0]
    loud_rec, loud_src = _loud_blocks(facts["audio"], facts["audio_rate"]), _loud_blocks(speech_48k, OUT_RATE)
    speech_frames = -(-len(tiny_speech) * 3 // SPF)
    idle_frames = summary["frames"] - speech_frames - underruns
    print(
        f"\nrecording: {summary}\nMP4: {facts['video_codec']}+{facts['audio_codec']} {facts['size']}, "
        f"{facts['video_frames']} frames, video {facts['video_s']:.3f} s, audio {facts['audio_s']:.3f} s, "
        f"container {facts['container_s']:.3f} s; = {speech_frames} speech + {underruns} hold + {idle_frames} idle "
        f"frames; loud 20 ms blocks {loud_rec} (source {loud_src}); second recording {later['video_s']:.2f} s"
    )
    assert while_recording == 409 and restarted == 201 and twice == 409 and wrong == 401
    assert content_type == "video/mp4"
    assert (facts["video_codec"], facts["audio_codec"], facts["size"]) == ("h264", "aac", (128, 64))
    # the duration is that of the frames recorded: the speech, the hold frames and the idle frames around them
    assert summary["dropped_frames"] == 0 and summary["frames"] == summary["last_frame"] - summary["first_frame"] + 1
    assert facts["video_frames"] == summary["frames"]
    assert abs(facts["video_s"] - summary["frames"] / FPS) < 1e-6
    assert abs(facts["audio_s"] - facts["video_s"]) <= 0.05  # AAC frames are 21 ms
    assert summary["speech_frames"] == speech_frames + underruns and idle_frames >= 0.9 * FPS
    assert abs(loud_rec - loud_src) <= 3  # the speech is in the recording's audio, and nothing else is loud
    assert later["video_frames"] >= 0.5 * FPS and later["video_codec"] == "h264"
    assert not list(Path(server.config.recording_dir).glob(f"{session['id']}*.mp4.tmp"))


def test_recordings_expire_and_are_removed_at_shutdown(serve):
    srv = serve(recording_retention_s=1.5)  # a temporary folder

    async def record(http, stop_after: float) -> tuple[dict, bytes]:
        session = await create_session(http, srv.url, {"record": True})
        await asyncio.sleep(stop_after)
        async with http.delete(session["recording_url"], headers=auth(session)) as r:
            assert r.status == 200
        async with http.get(session["recording_url"], headers=auth(session)) as r:
            assert r.status == 200
            return session, await r.read()

    async def main():
        async with open_http(60) as http:
            expired, data = await record(http, 0.3)
            await asyncio.sleep(2.0)  # past the retention
            async with http.get(expired["recording_url"], headers=auth(expired)) as r:
                gone = r.status
            kept, _ = await record(http, 0.3)
            return expired, data, gone, kept

    expired, data, gone, kept = run(main())
    from server.outputs.recording import RECORDINGS

    path = srv.app[RECORDINGS].recordings[kept["id"]].path
    folder_files = sorted(p.name for p in path.parent.iterdir())
    assert path.is_file()
    srv.stop()  # the shutdown removes the recordings and their temporary folder (below)
    assert data[4:8] == b"ftyp" and gone == 404
    assert folder_files == [path.name]  # the expired one was deleted
    assert not path.exists() and not path.parent.exists()  # shutdown: the file and the temporary folder


def test_frames_websocket_format(server, tiny_speech):
    async def main():
        async with open_http(60) as http:
            session = await create_session(http, server.url)
            frames = await Frames.connect(http, session, keep_jpeg=True, quality=60)
            bot = await Bot.connect(http, session)
            await bot.wait_type("session.ready")
            await bot.push(tiny_speech)
            await bot.send({"type": "audio.end"})
            finished = await bot.wait_type("playback.finished", timeout=60)
            await asyncio.sleep(0.3)
            async with http.get(
                session["frames_url"].replace("ws://", "http://"), params={"quality": "0", "token": session["token"]}
            ) as r:
                bad_quality = r.status
            got = list(frames.frames)
            served = server.state.sessions.get(session["id"])
            drops = (served.pump.dropped, served.engine_session.dropped_frames)
            assert not served.pump.reads_off_loop  # the crop over its photo: nothing to compose, read on the loop
            await bot.close()
            await frames.close()
            await delete_session(http, session)
            return frames.start, got, finished, bad_quality, drops

    start, got, finished, bad_quality, (queue_drops, engine_skips) = run(main())
    assert start == {
        "type": "stream.start",
        "session_id": start["session_id"],
        "fps": 25,
        "width": 128,
        "height": 64,
        "sample_rate": 48000,
        "channels": 1,
        "jpeg_quality": 60,
        "alpha": False,
        "header_bytes": HEADER.size,
        "version": 1,
    }
    indices = [f.index for f in got]
    # every frame, in order; the only gaps are frame periods the engine skipped because the pacing task was late
    # (CPU contention; counted), none from this consumer's queue
    assert indices == sorted(indices) and queue_drops == 0
    assert indices[-1] - indices[0] + 1 - len(indices) <= engine_skips
    assert all(f.pts_us == f.index * 40000 for f in got) and all(len(f.audio) == SPF for f in got)
    image = Image.open(io.BytesIO(got[0].jpeg))
    assert image.format == "JPEG" and image.size == (128, 64)
    speech = [f for f in got if f.speaking]
    assert speech and all(f.utterance == finished["utterance"] for f in speech)
    assert not any(f.audio.any() for f in got if not f.speaking)  # idle frames are silent
    assert finished["frame"] == speech[-1].index  # the event names the frame that ended the utterance
    assert bad_quality == 400
    print(
        f"\nframes websocket: {len(got)} frames, {len(speech)} speaking, JPEG {len(got[0].jpeg)} bytes at q60; "
        f"frame periods skipped by the engine: {engine_skips}"
    )


def test_transparent_session_frames_carry_alpha(server):
    """A presenter photo (scikit-image's astronaut, 1920x1080) on a 1280x720 canvas with a transparent background:
    every frame on the frames websocket has the alpha flag and decodes (WebP) to RGBA, alpha 0 in the corners the
    backdrop fills (both top ones, the bottom right: her body reaches the bottom left) and 255 at the face's
    centre."""
    big = Image.fromarray(astronaut()).resize((1920, 1920), Image.Resampling.LANCZOS)
    photo = big.crop((0, 200, 1920, 1280))
    upload = io.BytesIO()
    photo.save(upload, "PNG")
    face_x, face_y = (detect_face_kps(photo).kps.mean(axis=0) * 1280 / 1920).astype(int)

    async def main():
        async with open_http(120) as http:
            async with http.post(f"{server.url}/v1/avatars", data=avatar_form(upload.getvalue())) as r:
                assert r.status == 201, (r.status, await r.text())
                avatar = await r.json()
            body = {"avatar_id": avatar["id"], "framing": "1280x720", "background": "transparent"}
            session = await create_session(http, server.url, body)
            ws = await http.ws_connect(session["frames_url"], params={"token": session["token"]})
            start = json.loads((await ws.receive(timeout=60)).data)
            messages = [parse_frame((await ws.receive(timeout=60)).data) for _ in range(3)]
            off_loop = server.state.sessions.get(session["id"]).pump.reads_off_loop  # composed in the reader thread
            await ws.close()
            await delete_session(http, session)
            return start, messages, off_loop

    start, messages, off_loop = run(main())
    assert (start["width"], start["height"], start["alpha"]) == (1280, 720, True) and off_loop
    for message in messages:
        assert message.alpha and (message.width, message.height) == (1280, 720)
        assert Image.open(io.BytesIO(message.jpeg)).format == "WEBP"
        rgba = message.image()
        assert rgba.shape == (720, 1280, 4)
        alpha = rgba[..., 3]
        assert alpha[2, 2] == 0 and alpha[2, -3] == 0 and alpha[-3, -3] == 0, (alpha[2, 2], alpha[2, -3], alpha[-3, -3])
        assert alpha[face_y, face_x] == 255
    print(f"\ntransparent frames: WebP with alpha, {len(messages[0].jpeg)} bytes at 1280x720")


def test_slow_frames_consumer_loses_frames_and_stalls_nobody(server):
    """A consumer that stops reading (a tiny receive buffer, nothing read for 4 s) gets frames dropped; the session
    and a second consumer go on at the session's rate."""
    from websockets.asyncio.client import connect

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, server.url)
            fast = await Frames.connect(http, session)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            host, port = server.url.removeprefix("http://").split(":")
            sock.connect((host, int(port)))
            sock.setblocking(False)
            url = f"{session['frames_url']}?token={session['token']}&queue=4"
            async with connect(url, sock=sock, max_queue=1, compression=None, proxy=None) as slow:
                await slow.recv()  # stream.start
                pump = server.state.sessions.get(session["id"]).pump
                t0, frames0 = time.monotonic(), pump.frames
                await asyncio.sleep(4.0)
                elapsed, pumped = time.monotonic() - t0, pump.frames - frames0
                dropped = pump.dropped
                received, until = [], time.monotonic() + 1.5  # what it gets once it reads again
                while time.monotonic() < until:
                    received.append(parse_frame(await asyncio.wait_for(slow.recv(), 5)).index)
            fast_frames = [f.index for f in fast.frames]
            await fast.close()
            await delete_session(http, session)
            return elapsed, pumped, dropped, received, fast_frames

    elapsed, pumped, dropped, received, fast_frames = run(main())
    gaps = sum(1 for a, b in zip(received, received[1:]) if b != a + 1)
    print(
        f"\nslow consumer: pump read {pumped} frames in {elapsed:.2f} s; {dropped} dropped for the slow consumer; "
        f"it then received {len(received)} frames with {gaps} gaps; the other consumer {len(fast_frames)} frames"
    )
    assert pumped >= 0.9 * elapsed * FPS  # the session's clock never stalled
    assert fast_frames == list(range(fast_frames[0], fast_frames[0] + len(fast_frames)))  # nothing lost there
    assert dropped > 0 and gaps > 0 and received == sorted(received)
