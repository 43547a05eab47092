"""Peers on the same prompts: N requests at once, M output tokens each, greedy, EOS ignored, no prefix
caching. Each peer runs once to warm up (4 tokens), then `repeats` timed runs; tok/s = the mean of
(N x M generated tokens / wall) over the timed runs.

    transformers static-batch `generate`     base, and PEFT adapter at rank r (unmerged)
    transformers `generate_batch`            base, and PEFT adapter (continuous batching, in process)
    vLLM offline `LLM.generate`              base, and LoRA (in the vLLM venv: a subprocess running
                                             matryoshka_lora/loadtest/vllm_peer.py)
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

VLLM_PEER = Path(__file__).with_name("vllm_peer.py")
WARMUP_TOKENS = 4
PAGE_SIZE, MAX_BATCH_TOKENS = 256, 512  # generate_batch's cache pages; tokens per step (as our engine's default)


@dataclass
class PeerResult:
    system: str
    output_tok_s: float | None
    num_requests: int
    max_tokens: int
    wall_s: float | None = None
    error: str | None = None


def timed(
    system: str, generate: Callable[[int], int], num_requests: int, max_tokens: int, repeats: int = 2
) -> PeerResult:
    """`generate(max_tokens) -> generated tokens`: one warm-up run, then `repeats` timed runs."""
    try:
        generate(WARMUP_TOKENS)
        rates, walls = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            num_tokens = generate(max_tokens)
            if num_tokens != num_requests * max_tokens:
                raise RuntimeError(f"generated {num_tokens} tokens, expected {num_requests} x {max_tokens}")
            walls.append(time.perf_counter() - started)
            rates.append(num_tokens / walls[-1])
        log.info("%s: %.1f tok/s", system, sum(rates) / len(rates))
        return PeerResult(system, sum(rates) / len(rates), num_requests, max_tokens, sum(walls) / len(walls))
    except Exception as exc:  # a peer's API moving between versions must not end the run
        log.warning("%s failed: %s", system, exc)
        return PeerResult(system, None, num_requests, max_tokens, error=f"{type(exc).__name__}: {exc}")


def static_generate(model, prompts: list[list[int]], pad_id: int) -> Callable[[int], int]:
    """transformers `generate` on one left-padded batch, exactly `max_tokens` new tokens per row."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(max_tokens: int) -> int:
        config = GenerationConfig(
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id
        )
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return (out.shape[1] - width) * len(prompts)

    return run


def generate_batch(model, prompts: list[list[int]], pad_id: int) -> Callable[[int], int]:
    """transformers continuous batching (`generate_batch`), prefix sharing off, EOS never matched.

    The paged cache is sized explicitly (every request's prompt + output, in blocks of PAGE_SIZE tokens)
    and a step holds at most MAX_BATCH_TOKENS tokens: left to itself on CPU it sizes the cache from the
    free RAM (tens of GB, OOM-killed with a tiny model)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    def run(max_tokens: int) -> int:
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=pad_id)
        blocks = sum(math.ceil((len(p) + max_tokens + 1) / PAGE_SIZE) + 1 for p in prompts)
        cb_config = ContinuousBatchingConfig(
            allow_block_sharing=False, page_size=PAGE_SIZE, num_blocks=blocks, max_batch_tokens=MAX_BATCH_TOKENS
        )
        with torch.no_grad():  # not inference_mode: its worker thread then fails to reset its input buffers
            out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=cb_config)
        return sum(len(o.generated_tokens) for o in out.values())

    return run


def transformers_peers(
    model_dir: str | None,
    peft_dir: Path,
    prompts: list[list[int]],
    max_tokens: int,
    num_threads: int | None,
    repeats: int = 2,
) -> list[PeerResult]:
    """Static `generate` and `generate_batch`, each on the base model and with the PEFT adapter."""
    from peft import PeftModel

    from matryoshka_lora.models import load_base_model

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    model, tokenizer = load_base_model(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n, results = len(prompts), []
    results.append(
        timed("transformers generate (base)", static_generate(model, prompts, pad_id), n, max_tokens, repeats)
    )
    results.append(
        timed("transformers generate_batch (base)", generate_batch(model, prompts, pad_id), n, max_tokens, repeats)
    )
    peft_model = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    rank = json.loads((peft_dir / "adapter_config.json").read_text())["r"]
    results.append(
        timed(
            f"transformers generate (PEFT r{rank}, unmerged)",
            static_generate(peft_model, prompts, pad_id),
            n,
            max_tokens,
            repeats,
        )
    )
    results.append(
        timed(
            f"transformers generate_batch (PEFT r{rank})",
            generate_batch(peft_model, prompts, pad_id),
            n,
            max_tokens,
            repeats,
        )
    )
    return results


def vllm_peers(
    vllm_python: Path,
    model_dir: Path,
    peft_dir: Path,
    prompts: list[list[int]],
    max_tokens: int,
    num_threads: int | None,
    workdir: Path,
    timeout_s: float = 1800.0,
) -> list[PeerResult]:
    """vLLM's offline engine in the vLLM venv (base, then LoRA), via vllm_peer.py in a subprocess."""
    workdir.mkdir(parents=True, exist_ok=True)
    request = {
        "model": str(model_dir),
        "peft": str(peft_dir),
        "prompts": prompts,
        "max_tokens": max_tokens,
        "num_threads": num_threads,
    }
    (workdir / "vllm_request.json").write_text(json.dumps(request), encoding="utf-8")
    out = workdir / "vllm_result.json"
    out.unlink(missing_ok=True)
    cmd = [str(vllm_python), str(VLLM_PEER), str(workdir / "vllm_request.json"), str(out)]
    log.info("vLLM peer: %s", " ".join(cmd))
    n = len(prompts)
    try:
        with open(workdir / "vllm.log", "wb") as log_file:
            proc = subprocess.run(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
    except subprocess.TimeoutExpired:
        return [PeerResult("vLLM", None, n, max_tokens, error=f"timed out after {timeout_s:.0f} s")]
    if proc.returncode != 0 or not out.is_file():
        return [PeerResult("vLLM", None, n, max_tokens, error=f"exit {proc.returncode}; see {workdir / 'vllm.log'}")]
    return [PeerResult(**row) for row in json.loads(out.read_text())]


def as_rows(results: list[PeerResult]) -> list[dict]:
    return [asdict(r) for r in results]
