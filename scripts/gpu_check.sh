#!/usr/bin/env bash
# The first GPU run, in one command (<= ~8 minutes on one H200):
#   scripts/gpu_check.sh [OUT_DIR] [gpu_check.py flags...]
# OUT_DIR defaults to $OUT (the device machine's result folder), else ./gpu_check_out. Writes
# results.json, results.md, pytest_gpu.log and log.txt there. Needs only torch, triton,
# transformers, safetensors (+ pytest for the pytest section). A model directory to use instead of
# the default model (not installed on a bare image): --model-path DIR or ADRENALINE_GPU_CHECK_MODEL.
# On a machine without a GPU: scripts/gpu_check.sh DIR --device cpu (tiny shapes, Triton's
# interpreter: checks the code path, not the figures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
shift || true
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.mem --format=csv \
  >"$OUT_DIR/nvidia_smi.csv" 2>&1
python3 scripts/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
exit "${PIPESTATUS[0]}"
