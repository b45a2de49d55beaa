"""The chromeless viewer page, `GET /view/{session_id}?token=...`: the avatar alone, over WHEP, for OBS's Browser
Source or any screen (web_client/view.html + view.js; options in the page's query, see view.js).

The page is static: it carries no secret and checks nothing; the script uses the `token` of its own URL as the WHEP
bearer token. The session's `view_url` puts its view-only token there (`ServerSession.view_token`), which WHEP
accepts and every other endpoint refuses (403): a viewer's URL cannot drive the session. So that the token does not
leave through a `Referer`, the page is sent with `Referrer-Policy: no-referrer` (the access log already redacts
`token=`).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ..api.state import server_state
from ..errors import ApiError

PAGE = "view.html"


async def viewer_page(request: web.Request) -> web.StreamResponse:
    page = Path(server_state(request).config.web_root) / PAGE
    if not page.is_file():
        raise ApiError(404, f"the viewer page is not installed ({page} is missing)")
    headers = {"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}
    return web.FileResponse(page, headers=headers)
