"""Who may call what: the API key on control endpoints, the key or the session's token on session endpoints.

* API key (when the server has one): `Authorization: Bearer <key>` or `X-API-Key: <key>`.
* Session token (from `POST /v1/sessions`): `Authorization: Bearer <token>` or `?token=<token>` (browsers cannot
  set headers on a websocket).

Secrets are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hmac
import secrets

from aiohttp import web

from .errors import ApiError

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="vexpress-rt"'}


def new_token() -> str:
    return secrets.token_urlsafe(24)


def same_secret(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def has_api_key(request: web.Request, api_key: str | None) -> bool:
    return any(same_secret(s, api_key) for s in (bearer(request), request.headers.get("X-API-Key")))


def has_token(request: web.Request, token: str) -> bool:
    return any(same_secret(s, token) for s in (bearer(request), request.query.get("token")))


def require_api_key(request: web.Request, api_key: str | None) -> None:
    """Control endpoints: open when the server has no key, else the key is required."""
    if api_key is None:
        return
    if not has_api_key(request, api_key):
        raise ApiError(
            401, "a valid API key is required (Authorization: Bearer or X-API-Key)", headers=UNAUTHORIZED_HEADERS
        )


def require_session_token(request: web.Request, token: str, api_key: str | None) -> None:
    """Session endpoints: the session's own token, or the API key when the server has one."""
    if has_token(request, token) or (api_key is not None and has_api_key(request, api_key)):
        return
    raise ApiError(
        401, "this session's token is required (Authorization: Bearer or ?token=)", headers=UNAUTHORIZED_HEADERS
    )
