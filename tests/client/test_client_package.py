"""The client side is importable under the project's own name in a bot project, whatever that project calls its
modules: a typical bot folder has a `server.py` of its own, which shadows the server package's `server`."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from kit.paths import REPO_ROOT

from server.api.sessions import SESSION_FIELDS
from vexpress_rt_client import wire
from vexpress_rt_client.session import SessionOptions

PROBE = """
import json, sys
from vexpress_rt_client import AvatarSession, SessionOptions
from vexpress_rt_client.frames import parse_frame
import server  # the bot's own server.py
heavy = sorted(m for m in ("torch", "aiortc", "streaming", "vexpress_rt", "diffusers", "cv2") if m in sys.modules)
pipecat = None
try:
    from vexpress_rt_client.pipecat import VExpressVideoService
    pipecat = VExpressVideoService.__name__
except ImportError as exc:
    pipecat = f"ImportError: {exc}"
heavy_after = sorted(m for m in ("torch", "aiortc", "streaming", "vexpress_rt", "diffusers", "cv2") if m in sys.modules)
print(json.dumps({"bot_server": server.__file__, "heavy": heavy, "heavy_after_pipecat": heavy_after,
                  "pipecat": pipecat, "options": SessionOptions(fps=25).fps}))
"""


def test_a_bot_project_with_its_own_server_py_imports_the_client(tmp_path):
    (tmp_path / "server.py").write_text('ROLE = "the bot project\'s own web server"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))  # the installed project (here: the checkout), cwd the bot
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["bot_server"]).parent == tmp_path, report  # the bot's module, not the package's
    assert report["heavy"] == [], f"importing the client loaded {report['heavy']}"
    assert report["pipecat"] == "VExpressVideoService", report["pipecat"]
    assert report["heavy_after_pipecat"] == [], report
    assert report["options"] == 25


def test_the_old_import_paths_still_work():
    from server.clients.pipecat import VExpressVideoService
    from server.clients.session_client import AvatarSession, SessionOptions
    from vexpress_rt_client import AvatarSession as Same
    from vexpress_rt_client.pipecat import VExpressVideoService as SameService

    assert AvatarSession is Same and VExpressVideoService is SameService and SessionOptions().fps is None


def _table_types(markdown: str, heading: str) -> set[str]:
    """The `type` names in the first column of the first table under `heading`."""
    lines = markdown.split(heading, 1)[1].splitlines()
    after = itertools.dropwhile(lambda line: not line.startswith("|"), lines)
    table = "\n".join(itertools.takewhile(lambda line: line.startswith("|"), after))
    return set(re.findall(r"^\| `([a-z_.]+)` \|", table, flags=re.M)) - {"type"}  # the header row


def test_the_wire_module_names_every_message_the_protocol_documents():
    """Server and clients dispatch on vexpress_rt_client.wire's names: a message added to the protocol (docs) but not
    to the wire module, or the other way round, is caught here rather than by a bot that never hears of it."""
    doc = (REPO_ROOT / "docs" / "websocket.md").read_text()
    assert _table_types(doc, "### Client -> server") == set(wire.CLIENT_MESSAGES)
    documented = _table_types(doc, "### Server -> client") | {"stream.start"}  # the frames socket's first message
    assert "stream.start" in doc and documented == set(wire.SERVER_MESSAGES)


def test_session_options_name_every_field_a_session_accepts():
    """SessionOptions is written by hand in the client (it may import nothing of the server): every field that
    `POST /v1/sessions` accepts has an option of the same name, so a bot can set it without a raw body."""
    options = {f.name for f in fields(SessionOptions)}
    body_only = {"audio"}  # made from sample_rate and channels
    assert SESSION_FIELDS - body_only <= options, sorted(SESSION_FIELDS - body_only - options)
    assert {"record", "outputs"} <= options  # the session features' fields (api/session_features.py)
    body = SessionOptions(framing="1280x720", new_frames=2, outputs=[{"url": "rtmp://x/live/k"}]).body()
    assert body["framing"] == "1280x720" and body["new_frames"] == 2 and body["audio"]["sample_rate"] == 16000
