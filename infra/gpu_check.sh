#!/usr/bin/env bash
# The GPU check, on a single-GPU Linux machine that has PyTorch and transformers (>= 5.16) and no
# network: installs the wheels prepared by infra/gpu_wheels.sh (carried in .whl/), then runs the
# training stages on CUDA (infra/gpu_check.py) and prints their figures as JSON (also to
# $OUT/gpu_check.json). About 3 minutes on an H100; it stops itself after 8.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*" >/dev/null; then
  # DeepSpeed is a source package: it builds against the machine's own torch (no network, no isolation).
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target /tmp/rlpipe-site .whl/*
  export PYTHONPATH="/tmp/rlpipe-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 RLPIPE_CACHE="${RLPIPE_CACHE:-/tmp/rlpipe-cache}" RLPIPE_DATA_DIR="${RLPIPE_DATA_DIR:-/nonexistent}"
exec timeout 480 python3 infra/gpu_check.py "$@"
