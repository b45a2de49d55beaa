"""TURN REST API credentials (`serve --turn-secret SECRET --turn-url turn:host:port`).

Instead of a long-lived TURN user and password handed to every browser, each session gets its own credentials that
expire: username `<expiry unix time>:<session id>`, password base64(HMAC-SHA1(secret, username)). The TURN server
shares the secret (coturn: `use-auth-secret` and `static-auth-secret=SECRET`), checks the signature and refuses the
username after its expiry time; an allocation made before then lives on. The secret itself never leaves the server.

A credential cannot be revoked, so it lives no longer than needed: `--turn_ttl_s` (at most a day, checked at start)
and never past the end of its session's life (`--max_session_s` from the session's start), whichever comes first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time

from ..settings.config import ServerConfig


def turn_credentials(secret: str, session_id: str, ttl_s: float, now: float | None = None) -> tuple[str, str]:
    """(username, password) valid until now + ttl_s (whole seconds, rounded down: never later)."""
    expiry = math.floor((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{session_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def credential_ttl_s(config: ServerConfig, session_age_s: float = 0.0) -> float:
    """How long a session's credentials are valid from now: `--turn_ttl_s`, cut to what is left of the session's
    `--max_session_s` (0: no limit) when it is `session_age_s` old."""
    if not config.max_session_s:
        return config.turn_ttl_s
    return max(0.0, min(config.turn_ttl_s, config.max_session_s - session_age_s))


def session_ice_servers(
    config: ServerConfig, session_id: str, now: float | None = None, session_age_s: float = 0.0
) -> list[dict]:
    """The RTCIceServer list a session's client gets: the configured `--ice-server`s, then the `--turn-url`s with
    fresh credentials for this session (`session_age_s`: how long it has run; its credentials end with it)."""
    out = [s.to_json() for s in config.ice_server]
    if config.turn_secret and config.turn_url:
        ttl_s = credential_ttl_s(config, session_age_s)
        username, credential = turn_credentials(config.turn_secret, session_id, ttl_s, now)
        out.append({"urls": list(config.turn_url), "username": username, "credential": credential})
    return out
