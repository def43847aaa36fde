#!/usr/bin/env bash
# Builds the environment (scripts/setup.sh) and runs the main job: score the bundled GSM8K candidate
# set with SmolLM2-135M-Instruct and print per-step tables and the pick per problem.
# Extra args go to `freeprm demo` (e.g. --aggregate mean, --policy DIR, --reference DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/freeprm demo "$@"
