#!/usr/bin/env bash
# The whole test suite, in its own virtualenv. Extra arguments go to pytest.
# Without a GPU the tests turn on Triton's interpreter (tests/conftest.py), so the
# Triton kernels themselves run on the CPU; `gpu`-marked tests skip.
VENV=${TRIFUSE_TEST_VENV:-.venvs/test}
EXTRAS=dev
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/python" -m pytest "$@"
