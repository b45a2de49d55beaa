#!/usr/bin/env bash
# The prepared GPU run (docs/gpu.md): install the wheels shipped in .whl/, run the `gpu` tests and
# `bench --gpu --json`, write everything to OUT_DIR. Every part is bounded; the whole finishes in under 10 minutes.
# Without CUDA it ends quickly: the gpu tests skip and the bench prints {"skipped": "no CUDA device"}.
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0

if compgen -G ".whl/*.whl" >/dev/null; then  # the GPU machine has no index: what it lacks comes as wheels
    site=$(mktemp -d)
    if ! timeout 120 "$py" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl >"$out/pip.log" 2>&1; then
        echo "wheel install failed (see $out/pip.log)"; status=1
    fi
    export PYTHONPATH="$site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

timeout 30 "$py" - >"$out/env.json" 2>>"$out/env.log" <<'PY'
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": cuda,
                  "device": torch.cuda.get_device_name() if cuda else None}))
PY
echo "env: $(cat "$out/env.json" 2>/dev/null)"

timeout 240 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py --junitxml="$out/pytest_gpu.xml" \
    >"$out/pytest_gpu.log" 2>&1
rc=$?; echo "pytest -m gpu: rc=$rc ($(tail -n 1 "$out/pytest_gpu.log"))"
[ "$rc" -eq 0 ] || status=1

timeout 300 "$py" -m server bench --gpu --json ${BENCH_ARGS:-} >"$out/bench_gpu.json" 2>"$out/bench_gpu.log"
rc=$?; echo "bench --gpu --json: rc=$rc"
[ "$rc" -eq 0 ] || { status=1; tail -n 5 "$out/bench_gpu.log"; }
exit $status
