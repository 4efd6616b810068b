#!/usr/bin/env bash
# Re-resolve scripts/constraints.txt: the newest releases of every package the scripts install
# (direct and transitive), resolved in a fresh virtualenv. Then run `bash scripts/test.sh` on a
# fresh venv (rm -r .venvs) and commit the file only if the suite passes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip_install() { "$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==${TRIFUSE_TORCH:-2.13.0}"
pip_install ".[dev,bench]"   # every extra the scripts use
{
    echo "# Pinned versions of everything scripts/_venv.sh installs besides torch (pinned there)."
    echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" --version);"
    echo "# re-run it to move to the newest releases, then run the tests before committing."
    "$tmp/venv/bin/python" -m pip freeze --disable-pip-version-check --exclude-editable \
        | grep -viE '^(trifuse|torch)(==| @)' | LC_ALL=C sort -f
} > scripts/constraints.txt.new
mv scripts/constraints.txt.new scripts/constraints.txt
echo "wrote scripts/constraints.txt ($(grep -vc '^#' scripts/constraints.txt) packages)" >&2
