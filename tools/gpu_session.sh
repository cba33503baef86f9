#!/usr/bin/env bash
# On the lent GPU machine, in one device `run` (carry [".whl"], timeout_s 600), after tools/gpu_wheels.sh here:
#   bash tools/gpu_session.sh
# Writes every figure the real-time and offload issues ask for under $OUT (realtime.json, memory.json and the logs),
# in at most 9.5 minutes on an H200: the CUDA tests, the real-time benchmark (14B shapes, ours and the reference),
# then the offload plans. Each step has its own time limit so that one slow step leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
# 1. The tests that run only on CUDA (compile modes, fp8 compute, decode overlap): under 90 s.
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_speed.py tests/test_quantize.py \
  tests/test_overlap.py -k "cuda or gpu or fp8_compute" > "$OUT/tests.log" 2>&1
# 2. Real time: Helios-Distilled, 240 frames at 384x640, every option, then diffusers 0.42.1. The JSON is rewritten
#    after each option; if the call runs out, a second one with REALTIME_ARGS="--options eager,compile,fp8
#    --no-reference" measures the rest.
timeout 330 python3 -m helios.bench realtime ${REALTIME_ARGS:-} --json "$OUT/realtime.json" > "$OUT/realtime.log" 2>&1
# 3. Offload: a whole Distilled chunk with each plan (time, device peak, host RSS).
timeout 150 python3 -m helios.bench memory --device cuda > "$OUT/memory.json" 2> "$OUT/memory.log"
tail -n 20 "$OUT/realtime.log"
