#!/usr/bin/env bash
# kdpipe's CUDA paths on one GPU in one run (a few minutes; under 8 on one GPU): benchmarks/gpu_check.py says what
# it runs. --dry (or KDPIPE_GPU_CHECK=dry) runs the same steps on the CPU at 256 images, as CI does.
#
#   benchmarks/gpu_check.sh [--dry] [--amp bf16|fp16] [--num-images N] [--json PATH]
#
# The Python is the repository's .venv (make .venv/.installed), or $PYTHON.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
if [ "${KDPIPE_GPU_CHECK:-}" = dry ]; then
    set -- --dry "$@"
fi
export HF_HUB_OFFLINE=1
exec "$python" "$here/gpu_check.py" "$@"
