"""README's settings table, made from the settings' declarations (`python -m server.settings --markdown`)."""

from __future__ import annotations

from .setting import Setting

HEADER = "| flag | default | what |\n|---|---|---|"


def settings_table(settings: tuple[Setting, ...]) -> str:
    """One row per setting that has README text, joined by the settings declared after it without any."""
    rows: list[list[Setting]] = []
    for s in settings:
        if s.doc is not None or not rows:
            rows.append([s])
        else:
            rows[-1].append(s)
    lines = [HEADER]
    for row in rows:
        flags = ", ".join(f"`{s.flag}`" + (" (repeatable)" if s.kind is list else "") for s in row)
        defaults = ", ".join(text for text in (s.default_text() for s in row) if text)
        lines.append(f"| {flags} | {defaults} | {row[0].doc} |")
    return "\n".join(lines) + "\n"


def table_in(text: str) -> str:
    """The settings table as it stands in a markdown document (from its header to the first blank line)."""
    start = text.index(HEADER)
    end = text.find("\n\n", start)
    return text[start : len(text) if end < 0 else end + 1]
