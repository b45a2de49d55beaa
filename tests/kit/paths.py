"""Where things are, for tests in any folder under tests/."""

from __future__ import annotations

import os
from pathlib import Path

KIT = Path(__file__).resolve().parent
TESTS = KIT.parent
REPO_ROOT = TESTS.parent


def pythonpath(*first: str | Path) -> str:
    """PYTHONPATH for a child process: `first`, this checkout (its code, not an installed copy), tests/ (the kit),
    then what was there."""
    parts = [*map(str, first), str(REPO_ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)
