#!/usr/bin/env bash
# The main job: `trifuse bench` on its built-in default (the kernel self-check and
# micro-benchmark), in its own virtualenv. Extra arguments go to `trifuse bench`.
VENV=${TRIFUSE_RUN_VENV:-.venvs/run}
EXTRAS=bench
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/trifuse" bench "$@"
