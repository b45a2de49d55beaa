"""`python -m server ...` is `vexpress-rt ...` (the model's commands plus `serve`)."""

import sys

from .cli import main

sys.exit(main())
