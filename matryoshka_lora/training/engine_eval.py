"""Rank sweeps on the serving engine: every (example, rank) pair of an adapter in one continuous batch.

    engine = eval_engine(model, tokenizer)                 # the native engine, in this process, no HTTP
    engine.load_adapter(adapter_dir)
    for each example e, for each rank r:  enqueue greedy request (prompt_ids(e), adapter, rank r)
    step the engine until idle                             # mixed ranks share every forward step
    accuracy[r] = mean over e of tasks.score(task, text(e, r), e.answer)

It computes what the server serves (the same kernels, the same per-rank slices), several times faster
than `model.generate` at one rank per batch. Rank 0 is the base model.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from matryoshka_lora.training import data, tasks
from matryoshka_lora.training.evaluate import accuracy

log = logging.getLogger(__name__)


def eval_engine(
    model,
    tokenizer,
    model_dir: str | None = None,
    max_num_seqs: int = 64,
    max_model_len: int = 512,
    weight_format: str = "auto",
):
    """An engine over an already loaded base model, sized for offline batch evaluation, on the weights the
    server computes with. weight_format "auto" takes what a server started on model_dir takes: gguf+bf16
    where the CPU has AMX bf16 tiles, else the GGUF blocks, where model_dir has a GGUF file (the embedded
    default does) and the C kernels run, else float32; any other EngineConfig format is used as given."""
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine
    from matryoshka_lora.engine.weight_format import auto_formats
    from matryoshka_lora.errors import ConfigError

    max_model_len = min(max_model_len, model.config.max_position_embeddings)
    values = dict(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        max_num_batched_tokens=1024,
        max_queue_len=1_000_000,
        warmup=False,
        model=model_dir,
    )
    # the engine's own "auto" keeps float32 for a model handed in (it may be another one than model_dir's):
    # here it is model_dir's, so auto's formats are tried in its order
    *candidates, last = auto_formats() if weight_format == "auto" else (weight_format,)
    for candidate in candidates:
        try:
            return LLMEngine(EngineConfig(**values, weight_format=candidate), model, tokenizer)
        except ConfigError:  # no GGUF file for this model, or no AVX2 GEMM here
            continue
    return LLMEngine(EngineConfig(**values, weight_format=last), model, tokenizer)


def prompt_ids(tokenizer, prompt: str) -> tuple[int, ...]:
    """The chat-templated user prompt as the server encodes it."""
    text = data.render_prompt(tokenizer, data.prompt_messages(prompt))
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def engine_completions(
    engine, adapter: str | None, prompts: list[tuple[int, ...]], ranks: list[int], max_new_tokens: int
) -> dict[int, list[str]]:
    """Greedy completion of every prompt at every rank (0 = base), all enqueued at once."""
    from matryoshka_lora.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens)
    texts: dict[tuple[int, int], list[str]] = {}
    bar = tqdm(total=len(prompts) * len(ranks), desc="eval requests", unit="req", leave=False)

    def collector(key):
        def emit(event):
            texts[key].append(event.text_delta)
            if event.error:
                raise RuntimeError(f"request {event.request_id} failed: {event.error}")
            if event.finished:
                bar.update(1)

        return emit

    for rank in ranks:
        for i, ids in enumerate(prompts):
            texts[(rank, i)] = []
            request = GenerationRequest(f"eval-r{rank}-{i}", ids, params, adapter if rank else None, rank or None)
            engine.add_request(request, collector((rank, i)))
    while engine.scheduler.has_work():
        engine.step()
    bar.close()
    return {rank: ["".join(texts[(rank, i)]) for i in range(len(prompts))] for rank in ranks}


def engine_rank_sweep(
    engine, adapter: str | None, task: tasks.Task, examples: list[tasks.Example], ranks: list[int], max_new_tokens: int
) -> dict[int, float]:
    """Accuracy of `adapter` (loaded in `engine`) at each rank; rank 0 = the base model."""
    started = time.perf_counter()
    prompts = [prompt_ids(engine.tokenizer, ex.prompt) for ex in examples]
    completions = engine_completions(engine, adapter, prompts, list(ranks), max_new_tokens)
    results = {rank: accuracy(task, texts, examples) for rank, texts in completions.items()}
    log.info(
        "%s: %s (%d examples x %d ranks, %.1f s)",
        adapter,
        {r: round(a, 3) for r, a in results.items()},
        len(examples),
        len(ranks),
        time.perf_counter() - started,
    )
    return results
