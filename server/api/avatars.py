"""Portraits: `POST/GET /v1/avatars`, `GET/DELETE /v1/avatars/{id}`, and the default portrait registered at start-up.

Uploads are decoded in a thread (the header's size checked first) and pre-encoded on the engine's executor, behind a
bounded queue of registrations.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
from aiohttp import web
from PIL import Image

from streaming.avatar import AvatarInfo
from vexpress_rt.errors import InputError
from vexpress_rt.kps import load_reference_kps

from ..access import limits
from ..access.auth import require_api_key
from ..errors import ApiError
from .state import STATE, ServerState, server_state

log = logging.getLogger("server")

MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # decoders an upload may reach


def avatar_json(info: AvatarInfo, default_id: str | None) -> dict:
    return {
        "id": info.id,
        "name": info.name,
        "width": info.width,
        "height": info.height,
        "created": info.created,
        "kps": info.kps,
        "default": info.id == default_id,
    }


# -- avatars ------------------------------------------------------------------------------------------------------
def parse_kps(text: str) -> np.ndarray:
    """`[[x, y], ...]` (3 or 5 points) or `{"kps": [...]}`, pixels of the uploaded image."""
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data["kps"]
        kps = np.asarray(data, dtype=np.float32)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise ApiError(400, f'kps: expected JSON [[x, y], ...] or {{"kps": ...}} ({str(exc)[:200]})') from exc
    if kps.shape not in ((3, 2), (5, 2)) or not np.isfinite(kps).all():
        raise ApiError(400, f"kps: expected 3 or 5 finite [x, y] points, got shape {kps.shape}")
    return kps[:3]


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A portrait from uploaded bytes (PNG, JPEG, WebP, GIF, BMP). Its size is checked from the header, before any
    pixel is decoded (decompression bombs: 413); unreadable, truncated or corrupt data is a 400."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"image: {exc}", code="image_too_large") from exc
    except Exception as exc:  # UnidentifiedImageError, and whatever a broken header raises
        raise ApiError(400, f"image: not a readable {'/'.join(IMAGE_FORMATS)} picture ({exc})") from exc
    limits.check_image_pixels(image.width, image.height, max_pixels)
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data: OSError, SyntaxError, EOFError, struct.error...
        raise ApiError(400, f"image: cannot decode the picture ({type(exc).__name__}: {exc})") from exc


async def create_avatar(request: web.Request) -> web.Response:
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    if not request.content_type.startswith("multipart/"):
        raise ApiError(415, "send multipart/form-data with an 'image' file (and optional 'kps', 'name')")
    # 409 beyond --max_avatars, counting registrations in flight
    with state.avatar_places.reserve(len(state.engine.avatars()), state.config.max_avatars):
        return await _register_avatar(request, state)


async def _register_avatar(request: web.Request, state: ServerState) -> web.Response:
    max_upload = limits.upload_bytes(state.config)
    fields: dict[str, bytes] = {}
    total = 0
    try:
        async for part in limits.form_parts(request):
            data = bytearray()
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > max_upload:
                    raise ApiError(413, f"the upload is larger than {state.config.max_upload_mb:g} MiB")
                data += chunk
            if part.name is not None and part.name in ("image", "kps", "name"):
                fields[part.name] = bytes(data)
    except (ValueError, AssertionError, TypeError, UnicodeError) as exc:
        raise ApiError(400, f"malformed multipart body: {str(exc)[:200]}") from exc
    if not fields.get("image"):
        raise ApiError(400, "the form needs an 'image' file")
    kps = parse_kps(fields["kps"].decode("utf-8", "replace")) if fields.get("kps") else None
    name = fields["name"].decode("utf-8", "replace")[:200] if fields.get("name") else None
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    with state.avatar_jobs:  # a bounded queue in front of the device (decoding included): 503 beyond
        # Decoding a 40 MP picture takes most of a second: in a thread, never on the loop that paces every session.
        image = await loop.run_in_executor(None, decode_image, fields["image"], state.config.max_image_pixels)
        avatar = await loop.run_in_executor(state.executor, lambda: state.engine.add_avatar(image, kps, name))
    log.info("avatar %s registered in %.2f s", avatar.id, time.perf_counter() - started)
    body = avatar_json(avatar, state.default_avatar_id)
    return web.json_response(body, status=201, headers={"Location": f"/v1/avatars/{avatar.id}"})


async def list_avatars(request: web.Request) -> web.Response:
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    return web.json_response({"avatars": [avatar_json(a, state.default_avatar_id) for a in state.engine.avatars()]})


def _avatar_or_404(state: ServerState, avatar_id: str):
    avatar = state.engine.get_avatar(avatar_id)
    if avatar is None:
        raise ApiError(404, f"no avatar {avatar_id!r}")
    return avatar


async def get_avatar(request: web.Request) -> web.Response:
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    avatar = _avatar_or_404(state, request.match_info["avatar_id"])
    return web.json_response(avatar_json(avatar, state.default_avatar_id))


async def delete_avatar(request: web.Request) -> web.Response:
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    avatar_id = request.match_info["avatar_id"]
    _avatar_or_404(state, avatar_id)
    if avatar_id == state.default_avatar_id:
        raise ApiError(409, "the default avatar cannot be deleted")
    # on the executor: releasing its cached inputs takes the model lock, held for a whole worker call
    await asyncio.get_running_loop().run_in_executor(state.executor, state.engine.remove_avatar, avatar_id)
    return web.Response(status=204)


# -- the default portrait -------------------------------------------------------------------------------------------
async def start_default_avatar(app: web.Application) -> None:
    """Check the default portrait's path now (a typo fails the start), register it in the background: the port
    opens (and `/healthz` answers) at once, `/readyz` says `starting` until the portrait is encoded (minutes on a
    small CPU at 512x512, longer than a supervisor waits for a port)."""
    state = app[STATE]
    if not Path(state.config.avatar).is_file():
        raise InputError(f"--avatar: portrait not found: {state.config.avatar}")
    state.startup_task = asyncio.get_running_loop().create_task(_register_default_avatar(app), name="default-avatar")


async def _register_default_avatar(app: web.Application) -> None:
    state = app[STATE]
    cfg = state.config
    path = Path(cfg.avatar)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()

    def register():
        image = decode_image(path.read_bytes())
        kps_path = cfg.avatar_kps_path()
        kps = load_reference_kps(kps_path) if kps_path else None
        return state.engine.add_avatar(image, kps, "default")

    try:
        avatar = await loop.run_in_executor(state.executor, register)
    except Exception as exc:
        state.startup_error = f"the default portrait {path.name} could not be registered: {exc}"
        log.exception("%s; no session can open", state.startup_error)
        return
    state.default_avatar_id = avatar.id
    log.info("default avatar %s (%s) ready in %.2f s", avatar.id, path.name, time.perf_counter() - started)
    try:  # graphs captured and the cost per batch size measured before /readyz says ready (warm_up logs it)
        await loop.run_in_executor(state.executor, state.engine.warm_up, avatar.id)
    except Exception as exc:
        state.startup_error = f"the engine could not warm up: {exc}"
        log.exception("%s; no session can open", state.startup_error)
