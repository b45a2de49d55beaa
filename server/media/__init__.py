"""A session's media: the pump every sink reads from, its WebRTC tracks, diagnostic marks, audio files decoded for
it."""
