"""The README and docs work as written: every shell and Python block runs (tests/kit/netns_docs.py) or says why not.

The run happens in a loopback-only network namespace with the demo model (`vexpress-rt make-demo-model`, the
tour's first command), so `localhost:8080` and the RTMP ingest on `localhost:1935` are exactly the documented
addresses and nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from kit.docs_blocks import DOC_FILES, all_blocks
from kit.paths import KIT, REPO_ROOT, pythonpath
from kit.skips import skip_or_fail

pytestmark = pytest.mark.timeout(900)
RUN_TIMEOUT_S = 720


def test_every_doc_is_covered_and_stands_alone():
    docs = {f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md")}
    assert docs <= set(DOC_FILES), f"not in tests/kit/docs_blocks.DOC_FILES: {sorted(docs - set(DOC_FILES))}"
    for file in DOC_FILES:
        text = (REPO_ROOT / file).read_text(encoding="utf-8")
        assert "../shared" not in text, f"{file} names a file outside the repository"


def test_every_block_either_runs_or_says_why_not():
    blocks = all_blocks()
    runnable = [b.where for b in blocks if b.runs]
    skipped = {b.where: b.not_run for b in blocks if b.not_run is not None}
    assert all(len(reason) > 10 for reason in skipped.values()), skipped
    # the tour's five jobs, the bot snippets and the frame parser are among those run
    assert len(runnable) >= 10, runnable
    print("run:", runnable, "\nnot run:", json.dumps(skipped, indent=1))


def test_the_docs_run_as_written(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        skip_or_fail("a loopback-only network namespace needs root and unshare (util-linux)")
    if shutil.which("jq") is None or shutil.which("curl") is None:
        skip_or_fail("the README's recipes use curl and jq")
    driver = KIT / "netns_docs.py"
    script = f"ip link set lo up && exec '{sys.executable}' '{driver}' '{tmp_path}' --timeout {RUN_TIMEOUT_S - 30}"
    env = dict(os.environ, PYTHONPATH=pythonpath())  # the checkout and the kit (the driver imports it)
    proc = subprocess.Popen(
        ["unshare", "-n", "bash", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=10)
    lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    report = json.loads(lines[-1][len("REPORT ") :])
    for block in report.get("blocks", []):
        print(f"{block['where']}: {'ok' if block['ok'] else 'FAILED'} in {block['seconds']} s")
    print("total", report["seconds"], "s")
    assert "error" not in report, report
    failed = [b for b in report["blocks"] if not b["ok"]]
    assert not failed, "\n\n".join(f"{b['where']} (rc {b['rc']}):\n{b['output']}" for b in failed)
    ran = {b["where"] for b in report["blocks"]}
    assert ran == {b.where for b in all_blocks() if b.runs}, ran
