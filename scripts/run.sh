#!/usr/bin/env bash
# The main job: `trifuse bench` with no suite named (bench/default.py), in its own virtualenv:
# every kernel and model family checked, ONNX exported and verified, then timed; --quick (the
# default without a GPU) or --full (the default on a GPU); report in ./results/<run>/report.md.
# Extra arguments go to `trifuse bench` (e.g. --full, --keep-onnx, --wide, --threads 2, kernels).
VENV=${TRIFUSE_RUN_VENV:-.venvs/run}
EXTRAS=bench
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/trifuse" bench "$@"
