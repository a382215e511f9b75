#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The gpu extra (Triton) for the tests only: its CPU interpreter runs the Triton kernels' tests
# without a GPU. The demo does not need it, so setup.sh leaves it out.
.venv/bin/python -c "import triton" 2>/dev/null || .venv/bin/python -m pip --disable-pip-version-check -q install -e ".[test,gpu]"
exec .venv/bin/python -m pytest -q "$@"
