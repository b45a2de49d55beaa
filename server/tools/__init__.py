"""Tools beside the runtime: `vexpress-rt soak` (real clients against a served app for hours: latency, memory, fds,
tasks) and `vexpress-rt push` (an audio file to a session's bot websocket). The server never imports them; only the
command line does."""
