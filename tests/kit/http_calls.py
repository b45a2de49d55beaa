"""HTTP helpers for the tests: a client session, bearer headers, create/delete a session, websocket URLs and
messages, a portrait upload form, and a log check for exceptions nobody handled."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp

UNHANDLED = ("Traceback", "Error handling request", "Unhandled exception", "unhandled error", "Task exception")


def unhandled_records(records: list[logging.LogRecord]) -> list[str]:
    """Log records that show an exception nobody handled (or a handler logged with its traceback)."""
    bad = []
    for r in records:
        text = r.getMessage()
        if r.exc_info or any(marker in text for marker in UNHANDLED):
            bad.append(f"{r.name} {r.levelname}: {text[:300]}")
    return bad


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def http(timeout: float = 30) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))


async def create_session(client: aiohttp.ClientSession, url: str, body: dict | None = None, **kw) -> dict:
    async with client.post(f"{url}/v1/sessions", json=body or {}, **kw) as r:
        assert r.status == 201, (r.status, await r.text())
        return await r.json()


async def delete_session(client: aiohttp.ClientSession, session: dict, base_url: str | None = None) -> int:
    """DELETE the session (`session["url"]`, or under `base_url` by its id); 204, or 404 when it ended already."""
    url = f"{base_url}/v1/sessions/{session['id']}" if base_url else session["url"]
    async with client.delete(url, headers=bearer(session["token"])) as r:
        assert r.status in (204, 404), (r.status, await r.text())
        return r.status


def ws_url(session: dict, path: str = "ws") -> str:
    return session["ws_url"].rsplit("/", 1)[0] + f"/{path}?token={session['token']}"


async def ws_messages(ws, seconds: float, until=None) -> list:
    """Messages received within `seconds` (JSON decoded; binary as bytes); stops at close, or after the message
    for which `until(message)` is true."""
    out = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        if msg.type == aiohttp.WSMsgType.TEXT:
            out.append(json.loads(msg.data))
        elif msg.type == aiohttp.WSMsgType.BINARY:
            out.append(msg.data)
        else:
            out.append(msg.type)
            break
        if until is not None and until(out[-1]):
            break
    return out


def avatar_form(image: bytes, kps: str | bytes | None = None, name: str | None = None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", image, filename="portrait.bin", content_type="application/octet-stream")
    if isinstance(kps, bytes):
        form.add_field("kps", kps, filename="kps.bin")
    elif kps is not None:
        form.add_field("kps", kps)
    if name is not None:
        form.add_field("name", name)
    return form
