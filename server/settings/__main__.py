"""`python -m server.settings --markdown`: README's settings table, from the settings' declarations."""

from __future__ import annotations

import argparse
import sys

from .config import SETTINGS
from .markdown import settings_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.settings", description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print README's settings table (markdown)")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(settings_table(SETTINGS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
