#!/usr/bin/env bash
# The prepared check of mrplab's CUDA paths, for a machine with an NVIDIA GPU, in one command (4 minutes on one
# H200: the tests 101 s, the benchmark 123 s):
#
#   1. tests/test_accelerator.py: every step (MRP with its controls, SL, fine-tuning, the encoder; per-run and
#      shared data; eager and fused; fp32, and bf16 where the GPU has it) against the CPU's eager numbers, a
#      tiny run on the GPU against the same seeds' CPU run, and precision/compile auto on the GPU against the
#      CPU's verdicts;
#   2. benchmarks/batching.py --shared on the GPU: R = 8 batched and on shared data against 8 single-seed runs.
#
# From the repository root, with a Python whose torch sees the GPU:
#
#   bash benchmarks/device_check.sh [OUT]        # logs and batching.json under OUT (default runs/device-check)
#
# It keeps within MRPLAB_CHECK_S seconds (default 560, for a 10-minute command): the tests may take up to
# MRPLAB_CHECK_TESTS_S of them (default 220; interrupted there, pytest still prints what passed), the benchmark
# the rest (stopped there, its log still holds every run that finished). Each part's start and length go to
# OUT/check.log.
#
# mrplab runs from src/ (PYTHONPATH), nothing is installed. A Python that lacks some of the dependencies these
# checks import (pydantic with pydantic-core, annotated-types and typing-inspection: images with torch for GPUs
# often lack them) takes them as wheels in .whl/ at the repository root, installed first to
# a temporary folder; download them where pip reaches the package index, for the GPU machine's Python, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection
set -o pipefail
out="${1:-${OUT:-runs/device-check}}"
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "error: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$site"${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MRPLAB_CACHE_DIR="${MRPLAB_CACHE_DIR:-$(mktemp -d)}"  # probes and kernels afresh, as on a new machine
python3 -c 'import torch' 2>/dev/null || { echo "error: python3 has no torch: run this with a Python whose torch sees the GPU" >&2; exit 2; }
python3 -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", ok,
torch.cuda.get_device_name(0) if ok else ""); sys.exit(0 if ok else 2)' || { echo "error: torch sees no CUDA device" >&2; exit 2; }
budget="${MRPLAB_CHECK_S:-560}" tests_s="${MRPLAB_CHECK_TESTS_S:-220}"
mkdir -p "$out"
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$out/check.log"; }
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$out/check.log"
log "tests/test_accelerator.py (at most ${tests_s} s)"
timeout -s INT -k 10 "$tests_s" python3 -m pytest -q -rs -p no:cacheprovider tests/test_accelerator.py 2>&1 \
    | tee "$out/tests.log" || status=1
left=$((budget - SECONDS))
if [ "$left" -lt 60 ]; then  # (timeout 0 would mean no limit at all)
    log "benchmarks/batching.py skipped: ${left} s left of MRPLAB_CHECK_S=${budget}"; status=1
else
    log "benchmarks/batching.py --shared --set device=cuda (at most ${left} s)"
    mark="$(mktemp)"  # the results file counts only if this benchmark wrote it
    timeout -s INT -k 10 "$left" python3 benchmarks/batching.py --shared --set device=cuda 2>&1 \
        | tee "$out/batching.log" || status=1
    if [ benchmarks/results/batching.json -nt "$mark" ]; then cp benchmarks/results/batching.json "$out/batching.json"
    else log "batching.py wrote no results (stopped or failed)"; fi
fi
log "done, status $status"
exit $status
