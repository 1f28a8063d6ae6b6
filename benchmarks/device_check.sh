#!/usr/bin/env bash
# One accelerator check (issue 20), meant to finish within 5 minutes on one GPU: W1 at
# C = 100..100k and W2 at C = 10k..1M, the 1M-client stored population, a 16-experiment sweep
# and a transfer head on cached features, each beside the sequential baseline on the same
# device, plus a large-matmul roofline. Prints JSON lines (see benchmarks/device_check.py).
#
#   benchmarks/device_check.sh                    # full sizes (a GPU)
#   benchmarks/device_check.sh --smoke            # tiny sizes: CI, on a CPU
#   benchmarks/device_check.sh --out benchmarks/results/gpu_device_check.jsonl
#   PYTHON=.venv/bin/python benchmarks/device_check.sh --only roofline w1_w2
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/device_check.py" "$@"
