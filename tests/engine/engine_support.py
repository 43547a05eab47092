"""Helpers of the engine tests: requests, running an engine synchronously until it is idle, a tiny config."""

from __future__ import annotations

from matryoshka_lora.backends.base import (
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
)

PROMPTS = [(5, 17, 33, 9), (40, 41, 42), (7, 8, 9, 10, 11, 12, 13), (99,), (64, 3, 64, 3, 64)]


def request(i: int, adapter=None, rank=None, max_tokens=6, prompt=None, **sampling) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=sampling.pop("ignore_eos", True), **sampling)
    return GenerationRequest(f"req-{i}", tuple(prompt or PROMPTS[i % len(PROMPTS)]), params, adapter, rank,
                             tenant=sampling.get("tenant", "default"))


def run(engine, requests: list[GenerationRequest]) -> dict[str, list[GenerationEvent]]:
    """Enqueue all, step until idle; events per request id."""
    events: dict[str, list[GenerationEvent]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r, events[r.request_id].append)
    while engine.scheduler.has_work():
        engine.step()
    return events


def tokens(events: list[GenerationEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text(events: list[GenerationEvent]) -> str:
    return "".join(e.text_delta for e in events)

def tiny_config(**overrides):
    """The tiny Llama config of tests/conftest.py (kept in step with it), for models built in a test."""
    from transformers import LlamaConfig

    values = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256, "tie_word_embeddings": True,
                  "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    values.update(overrides)
    return LlamaConfig(**values)
