"""WebRTC with aiortc: ICE, the session's publisher (`/offer`), WHEP viewers, TURN credentials, the OBS viewer page."""
