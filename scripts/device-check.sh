#!/usr/bin/env bash
# The one command for a lent GPU (issue 20): environment and ceilings, the gpu-marked
# tests, kernels and models against their peers, compute-sanitizer; each stage under
# its own deadline carved from --budget (default 480 s), every result written as it
# completes. Runs on the GPU machine's image as it is: its python3, this checkout on
# PYTHONPATH, nothing installed or downloaded.
#
#   scripts/device-check.sh                      # on the GPU; files in $OUT or bench/results/device-<date>
#   scripts/device-check.sh --budget 300 --out /tmp/dc
#   scripts/device-check.sh --dry-run            # the CPU rehearsal: tiny shapes, same files, < 3 min
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m trifuse.bench.device "$@"
