"""The websockets: the voice-bot socket (`/ws`), the frames socket (`/frames`), and what they share."""
