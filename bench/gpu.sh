#!/usr/bin/env bash
# The GPU fast path: ResNet-50 at 224 px, bf16 + channels_last, on synthetic tensors (the ceiling)
# and on a folder of ~2,000 JPEGs through trainq's engine (decode: device and decode: workers),
# decode + augment alone, a plain script, GPU utilization, the service path (HTTP → Celery worker
# on CUDA → S3, kill -9 and resume); then exact-resume, CUDA RNG and GPU-checkpoint-on-a-CPU-worker
# checks. Writes bench/gpu-results.md (the figures measured so far, also on a timeout). Must end
# within BENCH_TIMEOUT_S (300 s: the budget on one H200).
#
#   bench/gpu.sh            # on a machine with a CUDA GPU and `pip install -e '.[dev]'` done
#   bench/gpu.sh --smoke    # the same code on a CPU with tiny sizes (checks the script, not the speed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# Deterministic cuBLAS for the exact-resume checks: read when the process first uses cuBLAS.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export PYTHONUNBUFFERED=1
# --smoke runs every part on a CPU: minutes on a quiet machine, more beside other work.
case " $* " in *" --smoke "*) DEFAULT_TIMEOUT_S=1200 ;; *) DEFAULT_TIMEOUT_S=300 ;; esac
exec timeout "${BENCH_TIMEOUT_S:-$DEFAULT_TIMEOUT_S}" "$PY" -m bench.gpu "$@"
