"""Scripts: an ordered list of audio files, TTS texts, pauses and marks that a session presents on its own
(`items.py` parses them, `runner.py` plays them, `api.py` is `POST/GET /v1/sessions/{id}/script`)."""
