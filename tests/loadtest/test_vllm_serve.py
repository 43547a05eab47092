"""The vLLM serve peer: its command and environment, its checks on what vLLM answered, a failed start
reported as a row with an error, and (where vLLM is installed: CI's .venv-vllm) a real measurement."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from matryoshka_lora.backends.vllm_env import allowed_cpus
from matryoshka_lora.loadtest.openloop import CompletionCount
from matryoshka_lora.loadtest.vllm_serve import VLLMServeProcess, check_counts, vllm_serve_peer


@pytest.mark.parametrize("num_threads, bound", [(None, None), (1, str(allowed_cpus()[0]))])  # the first CPU it may use
def test_command_and_cpu_binding(tmp_path, num_threads, bound):
    proc = VLLMServeProcess(
        Path("/venv/bin/python"), Path("/models/base"), ["--max-num-seqs", "4"], tmp_path / "log", num_threads
    )
    cmd = proc.command()
    assert cmd[:5] == ["/venv/bin/python", "-m", "matryoshka_lora.vllm_plugin", "serve", "/models/base"]
    for flag in ("--enforce-eager", "--no-enable-prefix-caching", "--max-num-seqs"):
        assert flag in cmd
    assert cmd[cmd.index("--port") + 1] == str(proc.port) and cmd[cmd.index("--dtype") + 1] == "float32"
    assert proc.ready_path == "/health"
    env = proc.environ()
    if bound is None:
        assert env.get("VLLM_CPU_OMP_THREADS_BIND") == os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    else:
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == bound
    assert "LD_PRELOAD" not in env or env["LD_PRELOAD"] == os.environ.get("LD_PRELOAD")


@pytest.mark.parametrize(
    "counts, ok",
    [
        ([CompletionCount(128, 64)] * 2, True),
        ([CompletionCount(128, 64)], False),  # one answer missing
        ([CompletionCount(128, 64), CompletionCount(129, 64)], False),  # another prompt than ours
        ([CompletionCount(128, 64), CompletionCount(128, 12)], False),  # stopped early
    ],
)
def test_check_counts(counts, ok):
    if ok:
        check_counts(counts, 128, 2, 64)
    else:
        with pytest.raises(RuntimeError, match="expected"):
            check_counts(counts, 128, 2, 64)


def test_a_server_that_does_not_start_is_a_row_with_an_error(tmp_path):
    result = vllm_serve_peer(Path("/bin/false"), tmp_path, "hi", 1, 2, 4, None, tmp_path)
    assert result.output_tok_s is None and "ServerStartError" in result.error
    assert result.system.startswith("vLLM serve (base)")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here (CI runs this in .venv-vllm)"
)
def test_measures_vllm_serving_the_base_model(default_model, tmp_path):
    """vLLM's own server on the default model (2-3 minutes to start on 2 cores): every answer is counted."""
    from matryoshka_lora.loadtest.prompts import exact_prompt
    from matryoshka_lora.models import default_model_dir

    prompt, ids = exact_prompt(default_model[1], 16)
    result = vllm_serve_peer(
        Path(sys.executable), default_model_dir(), prompt, len(ids), 2, 8, None, tmp_path, repeats=1
    )
    assert result.error is None, f"{result.error}\n{(tmp_path / 'vllm-serve.log').read_text()[-3000:]}"
    assert result.output_tok_s > 0 and result.wall_s > 0
