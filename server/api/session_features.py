"""What a feature adds to a served session through the core's session resource, so that `api/sessions.py` names no
feature: recording, live outputs, scripts and TURN each register a `SessionFeature` (app.py lists them).

* `body_field`: the field of `POST /v1/sessions` the feature takes out of the body before the session is made
  (`"record"`, `"outputs"`); `check` parses and validates it (ApiError -> 4xx, before any session exists).
* `opened`: fields added to the 201 answer, once the session is open (e.g. the recording's state, TURN credentials).
* `shown`: fields added to `GET /v1/sessions/{id}` (e.g. the outputs' and the script's reports).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..session.served import ServerSession

Checked = Any  # what a feature's `check` made of its body field, handed to its `opened`


@dataclass(frozen=True)
class SessionFeature:
    name: str
    body_field: str | None = None
    check: Callable[[web.Request, Any], Awaitable[Checked]] | None = None  # the field's value (None when absent)
    opened: Callable[[web.Request, ServerSession, Checked], Awaitable[dict]] | None = None
    shown: Callable[[web.Application, ServerSession], dict] | None = None


SESSION_FEATURES = web.AppKey("session_features", tuple)  # tuple[SessionFeature, ...], set by app.py


def features_of(app: web.Application) -> tuple[SessionFeature, ...]:
    return app.get(SESSION_FEATURES, ())


def body_fields(app: web.Application) -> set[str]:
    return {f.body_field for f in features_of(app) if f.body_field}


async def check_body(request: web.Request, data: dict) -> list[tuple[SessionFeature, Checked]]:
    """Take each feature's field out of `data` and check it, before the session opens."""
    checked = []
    for feature in features_of(request.app):
        value = data.pop(feature.body_field, None) if feature.body_field else None
        checked.append((feature, await feature.check(request, value) if feature.check else value))
    return checked


async def opened_fields(
    request: web.Request, session: ServerSession, checked: list[tuple[SessionFeature, Checked]]
) -> dict:
    body: dict = {}
    for feature, value in checked:
        if feature.opened is not None:
            body.update(await feature.opened(request, session, value))
    return body


def shown_fields(app: web.Application, session: ServerSession) -> dict:
    body: dict = {}
    for feature in features_of(app):
        if feature.shown is not None:
            body.update(feature.shown(app, session))
    return body
