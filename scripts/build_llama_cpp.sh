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
# The CPU features: -march=native, except on CPUs with AMX, where llama.cpp's AMX kernels (this version) die
# with SIGILL at their first tile instruction (the tile config / per-thread XTILEDATA permission; upstream
# ggml-org/llama.cpp PR 26954): there its AVX-512 + VNNI + BF16 kernels, named one by one.
ARCH=(-DGGML_NATIVE=ON)
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  ARCH=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON
        -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF
        -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
if [ -x "$ROOT/build/bin/llama-server" ] && [ "$(cat "$ROOT/build/arch-flags" 2>/dev/null)" = "${ARCH[*]}" ]; then
  echo "$ROOT"; exit 0
fi
mkdir -p "$ROOT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
rm -rf "$ROOT/src" && mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" "$ROOT/src"
command -v cmake >/dev/null && command -v ninja >/dev/null || "$PY" -m pip install --quiet cmake ninja >&2
PATH="$(dirname "$PY"):$PATH"
rm -rf "$ROOT/build"
cmake -S "$ROOT/src" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${ARCH[@]}" \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$ROOT/build" --target llama-server -j "$(nproc)" >&2
echo "${ARCH[*]}" > "$ROOT/build/arch-flags"
echo "$ROOT"
