"""`python -m streaming.bench ...` is `vexpress-rt bench ...` without the server package: the GPU machine has
neither aiortc nor prometheus_client (../shared/docs/GPU.md), and `server.cli` imports both through its other
commands. scripts/gpu_check.sh runs the bench this way."""

import sys

from vexpress_rt.cli import main

from .command import add_bench_command

sys.exit(main(["bench", *sys.argv[1:]], extra_commands=[add_bench_command]))
