#!/usr/bin/env bash
# Router + prefill + decode instances on this machine (see `python -m adrenaline.launch_pd --help`).
#
#   scripts/launch_pd.sh                                  # 1P1D on CPU, router on :8000
#   PREFILL_CPUS=0 DECODE_CPUS=1 scripts/launch_pd.sh -- --dtype bfloat16
#   NUM_PREFILL=2 NUM_DECODE=2 PREFILL_GPUS="0;1" DECODE_GPUS="2;3" scripts/launch_pd.sh
#
# Flags after `--` go to every instance (any `python -m adrenaline.launch_server` flag).
set -euo pipefail
args=(--prefill "${NUM_PREFILL:-1}" --decode "${NUM_DECODE:-1}" --port "${ROUTER_PORT:-8000}")
[[ -n "${PREFILL_CPUS:-}" ]] && args+=(--prefill-cpus "$PREFILL_CPUS")
[[ -n "${DECODE_CPUS:-}" ]] && args+=(--decode-cpus "$DECODE_CPUS")
[[ -n "${PREFILL_GPUS:-}" ]] && args+=(--prefill-gpus "$PREFILL_GPUS")
[[ -n "${DECODE_GPUS:-}" ]] && args+=(--decode-gpus "$DECODE_GPUS")
[[ -n "${LOG_DIR:-}" ]] && args+=(--log-dir "$LOG_DIR")
exec python -m adrenaline.launch_pd "${args[@]}" "$@"
