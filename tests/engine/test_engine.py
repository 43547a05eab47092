"""The engine end to end (synchronous steps): batching equivalence, KV slots, abort, adapters, sampling."""

from __future__ import annotations

import time

import pytest
import torch

from matryoshka_lora.errors import InvalidRankError, QueueFullError, UnknownAdapterError

from .engine_support import request, run, text, tokens

CASES = [(None, None), ("alpha", 1), ("alpha", 8), ("beta", 2), ("alpha", 3), ("beta", 4)]


def hf_greedy(base_model, adapter_path, rank, prompt, max_tokens):
    """HF `generate` (greedy, no EOS stop) with the adapter attached at `rank`."""
    import copy

    from transformers import GenerationConfig

    from matryoshka_lora.adapters.inject import set_inference_ranks
    from matryoshka_lora.adapters.store import attach_adapter, load_adapter

    model = copy.deepcopy(base_model)
    if adapter_path is not None:
        attach_adapter(model, load_adapter(adapter_path))
        set_inference_ranks(model, rank)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def test_mixed_batch_equals_alone_and_hf_generate(make_engine, tiny_hf, engine_adapters):
    engine = make_engine(max_num_seqs=8)
    reqs = [request(i, a, r, max_tokens=6) for i, (a, r) in enumerate(CASES)]
    together = run(engine, reqs)
    for r in reqs:
        alone = run(engine, [r])[r.request_id]
        assert tokens(together[r.request_id]) == tokens(alone)
        path = engine_adapters[r.adapter] if r.adapter else None
        assert tokens(alone) == hf_greedy(tiny_hf[0], path, r.rank, list(r.prompt_token_ids), 6)
    # ranks change the output, so the equivalence above is not vacuous
    outs = {tuple(tokens(together[r.request_id])) for r in reqs[1:3]}
    assert len(outs) == 2


def test_no_prompt_recompute_and_slots_freed(make_engine):
    """Each token's K/V is computed once: total computed tokens = prompts + outputs - 1 per request."""
    engine = make_engine(max_num_batched_tokens=4)  # forces chunked prefill
    reqs = [request(i, "alpha", 2, max_tokens=5) for i in range(3)]
    computed = 0
    events = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add_request(r, events[r.request_id].append)
    while engine.scheduler.has_work():
        computed += engine.step()
    assert computed == sum(len(r.prompt_token_ids) + 5 - 1 for r in reqs)
    assert engine.kv.num_free_slots == engine.kv.max_num_seqs
    assert all(len(tokens(e)) == 5 and e[-1].finish_reason == "length" for e in events.values())


def test_chunked_prefill_equals_whole(make_engine):
    long_prompt = list(range(10, 40))
    whole = run(make_engine(), [request(0, "alpha", 4, prompt=long_prompt)])
    chunked = run(make_engine(max_num_batched_tokens=7), [request(0, "alpha", 4, prompt=long_prompt)])
    assert tokens(whole["req-0"]) == tokens(chunked["req-0"])


def test_abort_frees_slot_at_once(make_engine):
    engine = make_engine()
    events = []
    key = engine.add_request(request(0, "alpha", 8, max_tokens=50), events.append)
    engine.step()
    engine.step()
    assert engine.kv.num_free_slots == engine.kv.max_num_seqs - 1
    engine.abort(key)
    engine.step()  # applies the abort before scheduling
    assert engine.kv.num_free_slots == engine.kv.max_num_seqs
    assert not engine.scheduler.has_work()
    assert events[-1].finished and events[-1].finish_reason == "abort"


@pytest.mark.parametrize(
    "req, error",
    [
        (request(0, "nope", 1), UnknownAdapterError),
        (request(0, "alpha", 9), InvalidRankError),
        (request(0, "alpha", 0), InvalidRankError),
        (request(0, "beta", 5), InvalidRankError),
        (request(0, None, 3), InvalidRankError),
    ],
)
def test_bad_requests_raise_before_enqueueing(make_engine, req, error):
    engine = make_engine()
    with pytest.raises(error):
        engine.add_request(req, lambda e: None)
    assert engine.scheduler.num_waiting == 0


def test_queue_is_bounded(make_engine):
    engine = make_engine(max_queue_len=3)
    for i in range(3):
        engine.add_request(request(i), lambda e: None)
    with pytest.raises(QueueFullError) as info:
        engine.add_request(request(3), lambda e: None)
    assert info.value.limit == 3


def test_hot_load_and_unload_with_request_in_flight(make_engine, engine_adapters):
    engine = make_engine()
    reference = tokens(run(engine, [request(0, "alpha", 8, max_tokens=8)])["req-0"])
    events = []
    engine.add_request(request(0, "alpha", 8, max_tokens=8), events.append)
    engine.step()
    engine.load_adapter(str(engine_adapters["gamma"]))  # load while alpha runs
    engine.unload_adapter("alpha")  # refuse new alpha requests at once
    with pytest.raises(UnknownAdapterError):
        engine.add_request(request(1, "alpha", 1), lambda e: None)
    alpha_slot = 0
    assert engine.adapters.table[0]["qkv"][alpha_slot] is not None  # still held by the running request
    gamma = run(engine, [request(2, "gamma", 4)])  # gamma serves while alpha finishes
    while engine.scheduler.has_work():
        engine.step()
    assert tokens(events) == reference  # the in-flight request was not disturbed
    assert engine.adapters.table[0]["qkv"][alpha_slot] is None  # freed after it finished
    assert len(tokens(gamma["req-2"])) == 6


def test_a_loaded_adapter_is_held_once_in_the_op_sets_layout(make_engine, engine_adapters, c_ops):
    """The C kernels' engine holds an adapter as panels only, packed at load (not in its first step), and
    none of its fused torch tensors."""
    from matryoshka_lora.engine.lora_panels import PanelLoRA

    engine = make_engine()
    if engine.runner.ops.name != "c-kernels":
        pytest.skip("the engine runs the torch ops here")
    entry = engine.load_adapter(str(engine_adapters["gamma"]))
    held = [w[entry.slot] for layer in engine.adapters.table for w in layer.values() if w[entry.slot] is not None]
    assert held and all(type(w) is PanelLoRA for w in held)


def test_replace_adapter_keeps_in_flight_weights(make_engine, engine_adapters):
    engine = make_engine()
    reference = tokens(run(engine, [request(0, "alpha", 8, max_tokens=8)])["req-0"])
    events = []
    engine.add_request(request(0, "alpha", 8, max_tokens=8), events.append)
    engine.step()
    engine.load_adapter(str(engine_adapters["gamma"]), name="alpha")  # replace alpha under its name
    while engine.scheduler.has_work():
        engine.step()
    assert tokens(events) == reference
    assert engine.adapters.get("alpha").r_max == 4


@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.5, 0.9)])
def test_seeded_sampling_is_reproducible(make_engine, temperature, top_p):
    engine = make_engine()
    sampled = {"temperature": temperature, "top_p": top_p, "max_tokens": 6}
    a = run(engine, [request(0, "alpha", 4, seed=7, **sampled)])["req-0"]
    neighbours = [request(i, "beta", 2, seed=i, **sampled) for i in range(1, 3)]
    b = run(engine, [request(0, "alpha", 4, seed=7, **sampled)] + neighbours)["req-0"]
    c = run(engine, [request(0, "alpha", 4, seed=8, **sampled)])["req-0"]
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)


def test_stop_string_cuts_the_output(make_engine):
    engine = make_engine()
    full = text(run(engine, [request(0, "alpha", 8, max_tokens=12)])["req-0"])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and full.find(stop) > 0
    events = run(engine, [request(0, "alpha", 8, max_tokens=12, stop=(stop,))])["req-0"]
    assert text(events) == full[: full.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_eos_stops_unless_ignored(make_engine):
    engine = make_engine()
    free = tokens(run(engine, [request(0, max_tokens=30)])["req-0"])
    eos = free[3]  # pretend the 4th generated token is the EOS token
    engine.eos_ids = frozenset({eos})
    stopped = run(engine, [request(0, max_tokens=30, ignore_eos=False)])["req-0"]
    assert tokens(stopped) == free[: free.index(eos) + 1] and stopped[-1].finish_reason == "stop"
    assert tokens(run(engine, [request(0, max_tokens=30)])["req-0"]) == free


def test_stats_and_kv_usage(make_engine):
    engine = make_engine()
    for i in range(6):
        engine.add_request(request(i, "alpha" if i % 2 else None, 2 if i % 2 else None, max_tokens=20), lambda e: None)
    engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (4, 2, 1.0)
    assert stats.running_adapters == ("alpha",) and stats.waiting_adapters == ("alpha",)


@pytest.mark.parametrize(
    "rank, budget_ms, reason, observed",
    [
        (None, 1e9, "budget", True),  # predicted to fit, ran its whole max_tokens: one ratio for the margin
        (None, 1e-6, "budget_unmet", False),  # served late: nothing was promised
        (4, None, "requested", False),  # no prediction at all
    ],
)
def test_the_latency_margin_learns_from_promised_requests(make_engine, rank, budget_ms, reason, observed):
    import dataclasses

    engine = make_engine()
    req = dataclasses.replace(request(0, "alpha", rank, max_tokens=6), latency_budget_ms=budget_ms)
    started = time.perf_counter()
    events = run(engine, [req])[req.request_id]
    last = events[-1]
    assert events[0].rank_reason == reason and last.finish_reason == "length"
    ratios = list(engine.budget.cost_model.margin._ratios)
    assert len(ratios) == int(observed)
    worst_running, set_at = engine.budget.cost_model.margin._in_flight  # set after every step: at the last, done
    assert set_at >= started
    if observed:
        assert ratios[0][1] == pytest.approx(last.total_s / last.predicted_latency_s, rel=0.05)
        assert worst_running == pytest.approx(max(1.0, ratios[0][1]), rel=0.05)
    else:
        assert worst_running == 1.0


@pytest.mark.parametrize(
    "learned_ratios, layers_off, outcome",
    [
        ([0.5] * 10 + [3.0] * 6, (), "budget_unmet"),  # margin 3 (nothing fits), typical 1: likely in time, served
        ([0.5] * 10 + [3.0] * 6, ("typical",), "refused"),  # the typical layer off: the margin decides
        ([4.0] * 16, (), "refused"),  # typical 4: even the median case misses
        ([1.0] * 16, (), "budget"),  # margin 1: rank 1 fits
    ],
)
def test_refuse_unmet_budget_refuses_only_what_the_typical_case_misses(
    make_engine, learned_ratios, layers_off, outcome
):
    """--budget-unmet refuse: a budget no rank meets under the margin (the 0.95 quantile of observed /
    predicted) is still served, at the lowest rank, when the median ratio's prediction meets it."""
    import dataclasses

    from matryoshka_lora.engine.budget.rank_policy import load_snapshot
    from matryoshka_lora.errors import BudgetUnmetError

    engine = make_engine(budget_layers_off=layers_off)
    now = time.perf_counter()
    for ratio in learned_ratios:
        engine.budget.cost_model.margin.observe(1.0, ratio, now)
    req = dataclasses.replace(request(0, "alpha", None, max_tokens=6), refuse_unmet_budget=True)
    entry = engine.adapters.get("alpha")
    lowest = min(entry.train_ranks)
    raw_s = engine.budget.cost_model.predict_latency(
        load_snapshot(engine.scheduler, engine.budget.arrivals), entry.slot, len(req.prompt_token_ids), 6, lowest
    )
    req = dataclasses.replace(req, latency_budget_ms=2.0 * raw_s * 1000.0)
    if outcome == "refused":
        with pytest.raises(BudgetUnmetError):
            engine.add_request(req, lambda event: None)
        assert not engine.scheduler.has_work()
        return
    events = run(engine, [req])[req.request_id]
    assert events[0].rank_reason == outcome and events[-1].finish_reason == "length"
    assert (events[0].rank == lowest) == (outcome == "budget_unmet")


def test_adapter_dtype_bfloat16_rounds_each_weight_at_load(make_engine, engine_adapters):
    """adapter_dtype "bfloat16": a float32 adapter is held as the nearest bfloat16 values (bf16 panels for the
    C kernels: half the bytes); "auto" holds it as saved."""
    from matryoshka_lora.engine.lora_panels import PanelLoRA

    def held(engine):
        entry = engine.load_adapter(str(engine_adapters["gamma"]))
        weights = [w[entry.slot] for layer in engine.adapters.table for w in layer.values() if w[entry.slot]]
        return [w.fused() if isinstance(w, PanelLoRA) else w for w in weights], weights

    as_saved, saved_layout = held(make_engine())
    rounded, rounded_layout = held(make_engine(adapter_dtype="bfloat16"))
    assert len(as_saved) == len(rounded) > 0
    assert not all(torch.equal(a.lora_A, a.lora_A.bfloat16().float()) for a in as_saved)  # a float32 adapter
    for a, b in zip(as_saved, rounded):
        assert torch.equal(b.lora_A, a.lora_A.bfloat16().float())
        for (b_m, *cols), (a_m, *want_cols) in zip(b.lora_B, a.lora_B):
            assert cols == want_cols and torch.equal(b_m, a_m.bfloat16().float())
    if isinstance(rounded_layout[0], PanelLoRA):
        assert all(w.bf16 for w in rounded_layout) and not all(w.bf16 for w in saved_layout)


@pytest.mark.parametrize(
    "field, value", [("adapter_dtype", "float16"), ("kv_cache_dtype", "fp8"), ("kv_cache_dtype", "float16")]
)
def test_unknown_dtypes_are_refused(field, value):
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{field}.*{value}.*bfloat16"):
        EngineConfig(**{field: value})


def test_a_bf16_kv_cache_holds_the_float32_values_rounded(make_engine):
    """kv_cache_dtype "bfloat16": the cache is bfloat16 (half the bytes); a prompt's K/V (computed alike in
    both engines: its prefill attends to the step's own K/V) are written as the float32 engine's rounded to
    bfloat16, and decoding reads them back to the requested length."""
    prompt = list(range(5, 25))
    caches, outputs = {}, {}
    for dtype in ("float32", "bfloat16"):
        engine = make_engine(kv_cache_dtype=dtype)
        outputs[dtype] = tokens(run(engine, [request(0, prompt=prompt, max_tokens=4)])["req-0"])
        caches[dtype] = engine.kv.cache[:, :, 0, :, : len(prompt)].clone()  # slot 0: the one request
    assert caches["bfloat16"].dtype == torch.bfloat16 and caches["float32"].dtype == torch.float32
    assert torch.equal(caches["bfloat16"], caches["float32"].to(torch.bfloat16))
    assert caches["float32"].abs().sum() > 0
    assert len(outputs["bfloat16"]) == len(outputs["float32"]) == 4
