#!/usr/bin/env bash
# Build llama.cpp's llama-server (the CPU peer of the load tests and benchmarks) from the llama.cpp tree
# that the llama-cpp-python sdist vendors (PyPI: the only registry this project may reach), once per
# version, into the cache (~5 min on 2 cores). Prints the directory holding llama-server and the
# converter convert_lora_to_gguf.py.
#
#   bash scripts/build_llama_cpp.sh            # -> ~/.cache/matryoshka-lora/llama.cpp/0.3.36
#   MATRYOSHKA_CACHE=/somewhere bash scripts/build_llama_cpp.sh
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
ROOT="${MATRYOSHKA_CACHE:-$HOME/.cache/matryoshka-lora}/llama.cpp/$VERSION"
if [ -x "$ROOT/build/bin/llama-server" ]; then echo "$ROOT"; exit 0; fi
mkdir -p "$ROOT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
rm -rf "$ROOT/src" && mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" "$ROOT/src"
command -v cmake >/dev/null && command -v ninja >/dev/null || "$PY" -m pip install --quiet cmake ninja >&2
PATH="$(dirname "$PY"):$PATH"
cmake -S "$ROOT/src" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$ROOT/build" --target llama-server -j "$(nproc)" >&2
echo "$ROOT"
