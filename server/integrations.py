"""Routes for voice bots, presenters and non-WebRTC consumers, added to the app by `create_app`:

| method, path | auth | module |
|---|---|---|
| GET /v1/sessions/{id}/ws | token | `ws.py`: the bot websocket (PCM16 in, JSON control and playback events) |
| GET /v1/sessions/{id}/frames | token | `frames_ws.py`: every frame as JPEG + PCM16 with timestamps |
| POST /v1/sessions/{id}/speak | token | `speak.py`: an audio file said as one utterance |
| POST/DELETE/GET /v1/sessions/{id}/recording | token | `recording.py`: MP4 recording of the session |

Schemas: docs/websocket.md.
"""

from __future__ import annotations

from aiohttp import web

from . import frames_ws, recording, sockets, speak, ws


def add_routes(app: web.Application, config) -> None:
    sockets.setup(app)
    recording.setup(
        app,
        getattr(config, "recording_dir", None),
        getattr(config, "recording_retention_s", recording.DEFAULT_RETENTION_S),
        int(config.recordings_quota_mb * 2**20),
    )
    r = app.router
    r.add_get("/v1/sessions/{session_id}/ws", ws.bot_socket)
    r.add_get("/v1/sessions/{session_id}/frames", frames_ws.frames_socket)
    r.add_post("/v1/sessions/{session_id}/speak", speak.speak)
    recording.add_routes(app)
