"""Who may call what: the API key on control endpoints, the key or the session's token on session endpoints.

* API key (when the server has one): `Authorization: Bearer <key>` or `X-API-Key: <key>`.
* Session token (from `POST /v1/sessions`): `Authorization: Bearer <token>`; `?token=<token>` only on websocket
  upgrades and the recording download (browsers cannot set headers there).
* View token (the session's `view_url` carries it): watching only, as the bearer token of the session's WHEP
  endpoint and resources (the viewer page sends it there); anywhere else it gets 403 `view_only`. A viewer page's URL
  then cannot speak, push outputs, run scripts, change controls or end the session.

Secrets are compared with `hmac.compare_digest`. The server may have several API keys (`--api-key` repeated); a key
is never logged, only `key_id` (a short hash) names it. Session ids and tokens come from `secrets` (unguessable).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from aiohttp import web

from ..errors import ApiError

QUERY_TOKEN_ENDPOINTS = ("/ws", "/frames", "/recording")  # under /v1/sessions/{id}: websockets, the MP4
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="vexpress-rt"'}


def new_token() -> str:
    """32 URL-safe characters, never starting with "-" (a token is a command-line argument too: `push --token`)."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # headers and queries may carry any bytes, lone surrogates too


def same_secret(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(_bytes(given), _bytes(expected))


def api_keys(api_key: str | Sequence[str] | None) -> tuple[str, ...]:
    """The configured key(s): None, one key, or several."""
    if not api_key:
        return ()
    return (api_key,) if isinstance(api_key, str) else tuple(api_key)


def key_id(key: str) -> str:
    """A name for a key that can be logged and counted: not the key."""
    return "key-" + hashlib.sha256(_bytes(key)).hexdigest()[:8]


def matching_key(request: web.Request, api_key: str | Sequence[str] | None) -> str | None:
    """The configured key the request carries, if any (every key is compared, in constant time each)."""
    given = (bearer(request), request.headers.get("X-API-Key"))
    found = None
    for key in api_keys(api_key):
        if any([same_secret(g, key) for g in given]) and found is None:
            found = key
    return found


def client_identity(request: web.Request, api_key: str | Sequence[str] | None) -> str:
    """Who a session is counted against (--max_sessions_per_key): the API key used, else the client's address."""
    key = matching_key(request, api_key)
    return key_id(key) if key is not None else f"addr-{request.remote or 'unknown'}"


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def has_api_key(request: web.Request, api_key: str | Sequence[str] | None) -> bool:
    return matching_key(request, api_key) is not None


def query_token_allowed(request: web.Request) -> bool:
    """`?token=` only where a browser cannot send a header: websocket upgrades and media it loads by URL (the
    recording in a `<video src>`). Elsewhere a token in a URL would only end up in histories and proxy logs."""
    return request.method in ("GET", "HEAD") and request.path.endswith(QUERY_TOKEN_ENDPOINTS)


def has_token(request: web.Request, token: str) -> bool:
    given = [bearer(request)] + ([request.query.get("token")] if query_token_allowed(request) else [])
    return any(same_secret(s, token) for s in given)


def require_api_key(request: web.Request, api_key: str | Sequence[str] | None) -> None:
    """Control endpoints: open when the server has no key, else a key is required."""
    if not api_keys(api_key):
        return
    if not has_api_key(request, api_key):
        raise ApiError(
            401, "a valid API key is required (Authorization: Bearer or X-API-Key)", headers=UNAUTHORIZED_HEADERS
        )


def require_session_token(
    request: web.Request, token: str, api_key: str | Sequence[str] | None, view_token: str | None = None
) -> None:
    """Session endpoints: the session's own token, or an API key when the server has one. The session's view token
    (`view_token`) gets 403 here: it is recognised, so its holder learns why, and refused."""
    if has_token(request, token) or has_api_key(request, api_key):
        return
    if view_token is not None and has_token(request, view_token):
        raise ApiError(
            403,
            "this is the session's view-only token (view_url): it may watch (WHEP, the viewer page) and nothing else",
            code="view_only",
        )
    raise ApiError(
        401,
        "this session's token is required (Authorization: Bearer; ?token= on websockets and the recording only)",
        headers=UNAUTHORIZED_HEADERS,
    )
