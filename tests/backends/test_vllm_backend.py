"""VLLMBackend on the real default model (SmolLM2-135M) and a random rank-8 adapter, through vLLM for real.

Needs vLLM in the running interpreter (CI: `bash .ci/vllm_deps.sh`, then `.venv-vllm/bin/pytest
tests/backends/test_vllm_backend.py`); skipped elsewhere. One engine serves the whole module (its start
takes 1-2 minutes on 2 CPU cores); every request is a few greedy tokens.
"""

from __future__ import annotations

import asyncio
import copy

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (bash .ci/vllm_deps.sh sets up .venv-vllm)")

from matryoshka_lora.errors import ConfigError, InvalidRankError, UnknownAdapterError  # noqa: E402
from matryoshka_lora.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

NUM_TOKENS = 6
R_MAX = 8
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def adapter_dir(default_model, tmp_path_factory):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter

    root = tmp_path_factory.mktemp("vllm-adapters")
    return save_random_adapter(default_model[0], root / "rnd", "rnd", R_MAX, seed=7, std=0.2)


@pytest.fixture(scope="module")
def prompt_ids():
    from transformers import AutoTokenizer

    from matryoshka_lora.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return tuple(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def reference_tokens(default_model, adapter_dir, prompt_ids):
    """Greedy tokens of our own rank-r forward (LoRALinear at rank r on the HF model), r in 0, 1, 2, 8."""
    import torch

    from matryoshka_lora.adapters.inject import set_inference_ranks
    from matryoshka_lora.adapters.store import attach_adapter, load_adapter

    model = copy.deepcopy(default_model[0])
    attach_adapter(model, load_adapter(adapter_dir))
    out = {}
    for rank in (0, 1, 2, R_MAX):
        set_inference_ranks(model, rank)
        ids = list(prompt_ids)
        with torch.no_grad():  # plain argmax, EOS included (the requests ignore EOS, they do not mask it)
            for _ in range(NUM_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        out[rank] = ids[len(prompt_ids) :]
    return out


@pytest.fixture(scope="module")
def served(adapter_dir, reference_tokens, tmp_path_factory):
    """(backend, event loop): one started VLLMBackend for the module, driven from a private loop."""
    from matryoshka_lora.backends.vllm_backend import VLLMBackend, VLLMConfig

    config = VLLMConfig(
        adapters=[str(adapter_dir)],
        max_loras=2,
        max_num_seqs=4,
        max_model_len=512,
        cache_dir=str(tmp_path_factory.mktemp("vllm-cache")),
    )
    backend = VLLMBackend(config)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(backend.start())
    yield backend, loop
    loop.run_until_complete(backend.shutdown(5.0))
    loop.close()


def request(rid, adapter="rnd", rank=None, prompt=(1, 2, 3), max_tokens=NUM_TOKENS, budget=None):
    return GenerationRequest(
        rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), adapter, rank, budget
    )


def run(served, coro):
    return served[1].run_until_complete(coro)


async def collect(backend, req):
    return [event async for event in backend.generate(req)]


def test_start_serves_the_adapter(served):
    backend, _ = served
    assert backend.ready and backend.model_name == "SmolLM2-135M-Instruct"
    assert backend.max_lora_rank == 8
    [info] = backend.list_adapters()
    assert (info.name, info.r_max, info.train_ranks, info.method) == ("rnd", R_MAX, (1, 2, 4, 8), "matryoshka")


@pytest.mark.parametrize(
    "adapter, rank, budget, served_rank, reason",
    [
        ("rnd", 2, None, 2, "requested"),
        ("rnd", None, None, R_MAX, "default"),
        (None, None, None, 0, "base"),
        ("rnd", None, 1e7, R_MAX, "budget"),
        ("rnd", None, 1e-3, 1, "budget_unmet"),
    ],
)
def test_request_returns_text_and_served_rank(served, prompt_ids, adapter, rank, budget, served_rank, reason):
    events = run(
        served, collect(served[0], request(f"rank-{adapter}-{rank}-{budget}", adapter, rank, prompt_ids, budget=budget))
    )
    assert {(e.rank, e.rank_reason) for e in events} == {(served_rank, reason)}
    assert "".join(e.text_delta for e in events).strip()
    assert sum(len(e.token_ids) for e in events) == NUM_TOKENS
    last = events[-1]
    assert last.finished and last.finish_reason == "length" and not any(e.finished for e in events[:-1])
    assert last.num_output_tokens == NUM_TOKENS and last.num_prompt_tokens == len(prompt_ids)
    assert 0 < last.ttft_s <= last.total_s and last.queue_s is not None and last.queue_s >= 0
    assert (last.predicted_latency_s is not None) == reason.startswith("budget")


@pytest.mark.parametrize("rank", [0, 1, 2, R_MAX])
def test_greedy_tokens_match_our_rank_r_forward(served, prompt_ids, reference_tokens, rank):
    events = run(served, collect(served[0], request(f"eq-{rank}", "rnd" if rank else None, rank or None, prompt_ids)))
    assert [t for e in events for t in e.token_ids] == reference_tokens[rank]


def test_the_ranks_give_different_models(reference_tokens):
    """Without this, the equivalence test above could pass with the adapter ignored."""
    assert reference_tokens[R_MAX] != reference_tokens[0]
    assert len({tuple(tokens) for tokens in reference_tokens.values()}) >= 3


def test_closing_the_stream_aborts_the_request(served, prompt_ids):
    backend, _ = served

    async def main():
        stream = backend.generate(request("abort-me", "rnd", 4, prompt_ids, max_tokens=400))
        first = await stream.__anext__()
        running = backend.stats()
        await stream.aclose()
        return first, running, backend.stats(), await collect(backend, request("after-abort", "rnd", 4, prompt_ids))

    first, running, after, events = run(served, main())
    assert not first.finished and first.rank == 4
    assert (running.num_running, running.running_adapters) == (1, ("rnd",))
    assert (after.num_running, after.num_waiting, after.running_adapters) == (0, 0, ())
    assert events[-1].finished and events[-1].num_output_tokens == NUM_TOKENS
    assert not backend._in_flight


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(rank=9), InvalidRankError),
        (dict(rank=0), InvalidRankError),
        (dict(adapter=None, rank=2), InvalidRankError),
        (dict(adapter="nope"), UnknownAdapterError),
        (dict(prompt=()), ConfigError),
        (dict(max_tokens=0), ConfigError),
    ],
)
def test_bad_requests_raise_before_enqueueing(served, kwargs, error):
    with pytest.raises(error):
        served[0].generate(request("bad", **kwargs))


def test_unload_forgets_the_slices_and_load_brings_them_back(served, adapter_dir, prompt_ids):
    backend, _ = served
    run(served, collect(backend, request("warm", "rnd", 2, prompt_ids)))
    id_before = backend._loras[("rnd", 2)].lora_int_id
    run(served, backend.unload_adapter("rnd"))
    assert backend.list_adapters() == [] and not backend._loras and len(backend.ids) == 0
    with pytest.raises(UnknownAdapterError):
        backend.generate(request("gone", "rnd", 2))
    with pytest.raises(UnknownAdapterError):
        run(served, backend.unload_adapter("rnd"))
    info = run(served, backend.load_adapter(str(adapter_dir), name="rnd"))
    assert info.name == "rnd" and info.r_max == R_MAX
    events = run(served, collect(backend, request("back", "rnd", 2, prompt_ids)))
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert backend._loras[("rnd", 2)].lora_int_id == id_before  # same (adapter, rank, files): same id


def test_encode_prompt_uses_the_chat_template(served, prompt_ids):
    backend, _ = served
    assert tuple(backend.encode_prompt(None, MESSAGES)) == prompt_ids
    assert backend.encode_prompt("Hello", None) == list(backend.tokenizer("Hello")["input_ids"])
    with pytest.raises(ConfigError):
        backend.encode_prompt("Hello", MESSAGES)
