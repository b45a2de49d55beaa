#!/usr/bin/env bash
# The prepared GPU run (docs/gpu.md): install the wheels shipped in .whl/, run the `gpu` tests and
# `bench --gpu --json --eager` (+ a new_frames=1 run with the serial worker beside the pipelined one), write
# everything to OUT_DIR. Every part is bounded; the whole finishes in about 10 minutes.
# Without CUDA it ends quickly: the gpu tests skip and the bench prints {"skipped": "no CUDA device"}.
# The bench runs as `python -m streaming.bench` (= `vexpress-rt bench`): the GPU machine has no aiortc or
# prometheus_client, which `python -m server` imports (tests/streaming/bench/test_gpu_env.py runs this script without them).
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0

if compgen -G ".whl/*.whl" >/dev/null; then  # the GPU machine has no index: what it lacks comes as wheels
    site=$(mktemp -d)
    if ! timeout 60 "$py" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl >"$out/pip.log" 2>&1; then
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

timeout 150 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/streaming/test_gpu.py --junitxml="$out/pytest_gpu.xml" \
    >"$out/pytest_gpu.log" 2>&1
rc=$?; echo "pytest -m gpu: rc=$rc ($(tail -n 1 "$out/pytest_gpu.log"))"
[ "$rc" -eq 0 ] || status=1

# CUDA graphs and the pipelined worker (the defaults) with the eager engine beside them, from the same run; then
# idling with a head motion (live idle frames) beside fix_face on the same engine.
timeout 300 "$py" -m streaming.bench --gpu --json --eager --idle_motion ${BENCH_ARGS:-} >"$out/bench_gpu.json" 2>"$out/bench_gpu.log"
rc=$?; echo "bench --gpu --json --eager: rc=$rc"
[ "$rc" -eq 0 ] || { status=1; tail -n 5 "$out/bench_gpu.log"; }

# The lower-latency schedule (one new frame per call, docs/streaming.md), where the per-call host work weighs
# most: 1 and 2 sessions, pipelined worker, then the serial one from the same run (`serial` key).
timeout 150 "$py" -m streaming.bench --gpu --json --new_frames 1 --sessions 1,2 --seconds 8 --no_components --serial \
    >"$out/bench_gpu_n1.json" 2>"$out/bench_gpu_n1.log"
rc=$?; echo "bench --gpu --new_frames 1 --serial: rc=$rc"
[ "$rc" -eq 0 ] || { status=1; tail -n 5 "$out/bench_gpu_n1.log"; }
# Recalibrate the simulator (`--device sim:<profile>`, streaming/sim/): the decoders timed alone, then a device
# profile from this run's figures (docs/simulator.md). Without CUDA there are no figures to calibrate from.
if grep -q '"cuda": true' "$out/env.json" 2>/dev/null; then
    timeout 60 "$py" -m streaming.bench --decoders --json >"$out/decoders.json" 2>"$out/decoders.log"
    if timeout 30 "$py" -m streaming.sim.calibrate "$out/bench_gpu.json" "$out/decoders.json" --name gpu \
        >"$out/profile_gpu.json" 2>"$out/profile_gpu.log"; then
        echo "simulator profile: $out/profile_gpu.json"
    else
        echo "simulator profile not written: $(tail -n 1 "$out/profile_gpu.log")"; status=1
    fi
else
    echo "simulator profile: not written (no CUDA device)"
fi
exit $status
