"""Pushing a session's paired audio and video out to a media server: RTMP/RTMPS/SRT ingest (`ingest.py`, H.264 +
AAC with PyAV) and WHIP (`whip.py`, WebRTC publish with aiortc), managed per session by `api.py`."""
