"""The tests' shared harness (on the path as `kit`: pyproject.toml sets pytest's pythonpath to tests/).

served         the server in this process (`ServerThread`, server/serving/inprocess.py), its test settings, the
               `server_fixture` factory and the `serve` fixture (tests/conftest.py), blocking HTTP calls
http_calls     HTTP helpers: a client, bearer headers, sessions, websocket URLs, a portrait form, a log check
ws_clients     the bot and frames websocket clients, a bystander client in a thread
media_synth    media made in the test (tones, PCM16, WAV, MP3, images) and measures of what came back
aiortc_viewer  aiortc viewers (WHEP, trickling), a peer that vanishes
sdp_frag       SDP for trickle ICE (RFC 8840)
rtmp_receiver  a real RTMP ingest (rtmp_ingest.py in a process) and what it recorded
whip_receiver  a WHIP endpoint recording what a publisher sends
waits          run, wait_for / wait_until (raise on timeout), free_port
fake_clock     a clock moved by hand
skips          skip locally, fail in CI
paths          REPO_ROOT, TESTS, KIT, a child's PYTHONPATH
tiny_model     the tiny random model, portrait and speech the suite builds
netns_*.py     drivers run in a loopback-only network namespace (Chromium, the docs' recipes)
rtmp_ingest.py, fake_tts.py, gpu_env/: programs and a site hook the tests start in processes of their own
"""
