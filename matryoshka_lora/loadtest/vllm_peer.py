"""The vLLM peer, run by the vLLM venv's python (never imported by the load test itself):

    VENV/bin/python matryoshka_lora/loadtest/vllm_peer.py REQUEST.json RESULT.json

REQUEST: {model, peft, prompts (token id lists), max_tokens, num_threads}. For "base" (LoRA off) and
then "LoRA" (the PEFT adapter on every request), each in a fresh subprocess of this script (one vLLM
engine per process): a warm-up of 4 tokens, then 2 timed `LLM.generate` runs of all prompts at once
(greedy, EOS ignored, prefix caching off). RESULT: a list of {system, output_tok_s, ...} rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPEATS, WARMUP_TOKENS = 2, 4


def measure(request: dict, lora: bool) -> dict:
    from matryoshka_lora.backends import vllm_env

    vllm_env.prepare_cpu_env(request.get("num_threads"))
    vllm_env.patch_vllm_version()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    max_len = max(len(p) for p in request["prompts"]) + request["max_tokens"] + 8
    kwargs = dict(
        model=request["model"],
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_num_seqs=max(len(prompts), 1),
        max_model_len=max_len,
        seed=0,
    )
    lora_request, system = None, "vLLM (base)"
    if lora:
        from vllm.lora.request import LoRARequest

        from matryoshka_lora.backends.vllm_loras import vllm_max_lora_rank

        rank = json.loads((Path(request["peft"]) / "adapter_config.json").read_text())["r"]
        kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(rank), max_loras=1)
        lora_request, system = LoRARequest("peer", 1, request["peft"]), f"vLLM (LoRA r{rank})"
    llm = LLM(**kwargs)

    def generate(max_tokens: int) -> int:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    generate(WARMUP_TOKENS)
    rates, walls = [], []
    for _ in range(REPEATS):
        started = time.perf_counter()
        num_tokens = generate(request["max_tokens"])
        walls.append(time.perf_counter() - started)
        rates.append(num_tokens / walls[-1])
    return {
        "system": system,
        "output_tok_s": sum(rates) / len(rates),
        "num_requests": len(prompts),
        "max_tokens": request["max_tokens"],
        "wall_s": sum(walls) / len(walls),
        "error": None,
    }


def main() -> None:
    request_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    if len(sys.argv) > 3:  # a child: one engine, one mode
        row = measure(json.loads(request_path.read_text()), lora=sys.argv[3] == "lora")
        result_path.write_text(json.dumps(row))
        return
    rows = []
    for mode in ("base", "lora"):
        part = result_path.with_suffix(f".{mode}.json")
        part.unlink(missing_ok=True)
        code = subprocess.call([sys.executable, __file__, str(request_path), str(part), mode])
        rows.append(
            json.loads(part.read_text())
            if code == 0 and part.is_file()
            else {
                "system": f"vLLM ({mode})",
                "output_tok_s": None,
                "num_requests": 0,
                "max_tokens": 0,
                "wall_s": None,
                "error": f"exit {code}",
            }
        )
    result_path.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
