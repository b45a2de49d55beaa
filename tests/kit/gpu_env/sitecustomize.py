"""The GPU machine's environment (../shared/docs/GPU.md), made from this one: imports of what it lacks fail.

On PYTHONPATH, Python imports this module at start-up (before any project code) and installs a finder that
raises ImportError for the packages below, as on a machine where they are not installed.
tests/streaming/bench/test_gpu_env.py runs the bench and scripts/gpu_check.sh under it.
"""

import sys
from importlib.abc import MetaPathFinder

# aiortc and its own dependencies, websockets, prometheus_client: the server's, never the engine's or the bench's
MISSING = frozenset({"aiortc", "aioice", "pylibsrtp", "pyee", "websockets", "prometheus_client"})


class _Missing(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MISSING:
            raise ImportError(f"No module named {name!r} (not on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _Missing())
