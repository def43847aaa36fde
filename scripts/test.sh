#!/usr/bin/env bash
# Builds the environment (scripts/setup.sh) and runs the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .  # the lint rules of pyproject.toml ([tool.ruff]); a finding fails CI before the tests run
export TRITON_INTERPRET=1  # Triton kernels run in the interpreter on CPU
exec python -m pytest -q "$@"
