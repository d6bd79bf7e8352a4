#!/usr/bin/env bash
# NVIDIA MPS for prefill/executor colocation: the prefill scheduler and its attention executor then
# run kernels on the GPU at the same time, the executor capped to a share of the SMs
# (--executor-sm-percent, which sets CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for its process only).
#
#   scripts/start_mps.sh [start|stop|status]
#
# Start it before the prefill instance, with the same CUDA_MPS_PIPE_DIRECTORY in both shells
# (clients find the daemon through it; the defaults below are MPS's own). For exclusive use of the
# GPU by MPS clients an admin may also set `nvidia-smi -c EXCLUSIVE_PROCESS` (not done here: it
# changes the device's settings). Without MPS everything still works: the executor's kernels
# time-slice with the prefill's (docs/gpu.md).
set -euo pipefail
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-log}

if ! command -v nvidia-cuda-mps-control >/dev/null; then
  echo "nvidia-cuda-mps-control not found: install the NVIDIA driver utilities (or run without MPS)" >&2
  exit 1
fi
case "${1:-start}" in
  start)
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if echo get_server_list | nvidia-cuda-mps-control >/dev/null 2>&1; then
      echo "MPS already running (pipe directory $CUDA_MPS_PIPE_DIRECTORY)"
    else
      nvidia-cuda-mps-control -d
      echo "MPS started; in the shell that starts instances: export CUDA_MPS_PIPE_DIRECTORY=$CUDA_MPS_PIPE_DIRECTORY"
    fi
    ;;
  stop) echo quit | nvidia-cuda-mps-control && echo "MPS stopped" ;;
  status) echo get_server_list | nvidia-cuda-mps-control ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
