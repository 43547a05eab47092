"""Helpers of the engine tests: requests, running an engine synchronously until it is idle, a tiny config."""

from __future__ import annotations

from tiny_config import tiny_llama_config as tiny_config  # noqa: F401  (re-exported for the engine tests)

from matryoshka_lora.types import GenerationEvent, GenerationRequest, SamplingParams

PROMPTS = [(5, 17, 33, 9), (40, 41, 42), (7, 8, 9, 10, 11, 12, 13), (99,), (64, 3, 64, 3, 64)]


def request(i: int, adapter=None, rank=None, max_tokens=6, prompt=None, **sampling) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=sampling.pop("ignore_eos", True), **sampling)
    return GenerationRequest(
        f"req-{i}",
        tuple(prompt or PROMPTS[i % len(PROMPTS)]),
        params,
        adapter,
        rank,
        tenant=sampling.get("tenant", "default"),
    )


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


def bare_sequence(request: GenerationRequest, rank_reason: str = "base"):
    """A base-model Sequence of `request` with no detokenizer, stop filter or generator (scheduler and
    budget tests)."""
    from matryoshka_lora.engine.sequence import Sequence

    return Sequence(
        request,
        emit=lambda e: None,
        adapter=None,
        adapter_slot=-1,
        rank=0,
        scale=0.0,
        rank_reason=rank_reason,
        detokenizer=None,
        stop_filter=None,
        generator=None,
        max_len=len(request.prompt_token_ids) + request.sampling.max_tokens,
    )
