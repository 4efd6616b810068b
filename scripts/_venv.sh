# Sourced by run.sh and test.sh: make (or reuse) the virtualenv "$VENV" and install
# trifuse into it with the extras "$EXTRAS", every other package at the version pinned in
# scripts/constraints.txt (re-resolve it with scripts/lock.sh). torch is pinned here, not in
# the library: 2.13.0 is the CPU build this project's machines carry; a loose pin would
# pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==${TRIFUSE_TORCH:-2.13.0}"
pip_install -c scripts/constraints.txt -e ".[${EXTRAS}]"
