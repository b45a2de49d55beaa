"""The code blocks of the README and docs/*.md, as the docs test runs them.

A ```bash (or ```sh) block is shell commands, a ```python block a snippet; both are run (tests/kit/netns_docs.py) unless
an HTML comment right above the block says why not: `<!-- not-run: reason -->`. Blocks in other languages (json,
yaml, nginx, caddyfile, plain) are data and configuration shown to the reader, not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kit.paths import REPO_ROOT

# The order they run in: the README's tour makes the demo model and starts the server the docs after it use.
DOC_FILES = ("README.md", "docs/websocket.md", "docs/controls.md", "docs/blink.md", "docs/streaming.md")
DOC_FILES += ("docs/deploy.md", "docs/gpu.md", "docs/parity.md", "docs/simulator.md", "SECURITY.md")
DOC_FILES += ("docs/framing.md",)
RUN_LANGUAGES = ("bash", "sh", "python")
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")


@dataclass(frozen=True)
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    not_run: str | None  # the reason given in the comment above it, or None

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.not_run is None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def blocks(file: str) -> list[Block]:
    lines = (REPO_ROOT / file).read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening.group(1), opening.group(2)
        body = []
        j = i + 1
        while j < len(lines) and not _FENCE.match(lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        above = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        reason = _NOT_RUN.search(above)
        out.append(Block(file, i + 1, language, "\n".join(body) + "\n", reason.group(1) if reason else None))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for file in DOC_FILES for b in blocks(file)]
