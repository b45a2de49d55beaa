"""The `--tts-command` template, checked where the settings are (a server refuses to start with a bad one) and
filled by `script/tts.py` for each text."""

from __future__ import annotations

import shlex


def parse_template(command: str) -> list[str]:
    """The command's arguments; ValueError unless it has both placeholders."""
    args = shlex.split(command)
    if not args or not any("{text}" in a for a in args) or not any("{out}" in a for a in args):
        raise ValueError(f"--tts-command {command!r} needs the placeholders {{text}} and {{out}}")
    return args
