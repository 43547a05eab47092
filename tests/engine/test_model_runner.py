"""The fused forward over the slot KV cache equals Hugging Face's forward (base model)."""

from __future__ import annotations

import pytest
import torch

from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.model_runner import ModelRunner, StepItem
from matryoshka_lora.engine.weights import fuse_weights

ATOL = 1e-4


def make_runner(hf_model, ops, max_num_seqs=4, max_model_len=64):
    weights = fuse_weights(hf_model, pack_linear=ops.pack_linear)
    kv = KVCache(weights.spec, max_num_seqs, max_model_len)
    return ModelRunner(weights, kv, ops=ops), kv


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize(
    "prompt_lens, chunk",
    [([5], None), ([7, 3, 1], None), ([9, 4], 3), ([6, 6, 2, 11], 4)],
)
def test_prefill_then_decode_equals_hf(tiny_model, step_ops, prompt_lens, chunk):
    """Prefill (whole or chunked, several sequences in one step), then decode with cache == HF recompute."""
    runner, kv = make_runner(tiny_model, step_ops)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in prompt_lens]
    slots = [kv.allocate() for _ in seqs]
    done = [0] * len(seqs)
    last_logits: dict[int, torch.Tensor] = {}
    # prefill, `chunk` tokens per sequence per step
    while any(d < len(s) for d, s in zip(done, seqs)):
        items, owners = [], []
        for i, s in enumerate(seqs):
            if done[i] < len(s):
                n = len(s) - done[i] if chunk is None else min(chunk, len(s) - done[i])
                items.append(StepItem(s[done[i] : done[i] + n], slots[i], done[i], done[i] + n == len(s)))
                owners.append(i)
                done[i] += n
        idx, logits = runner.run(runner.prepare(items))
        for j, row in zip(idx, logits):
            last_logits[owners[j]] = row
    for i, s in enumerate(seqs):
        torch.testing.assert_close(last_logits[i], hf_logits(tiny_model, s)[-1], atol=ATOL, rtol=0)
    # three decode steps of all sequences in one batch
    for _ in range(3):
        items = []
        for i, s in enumerate(seqs):
            s.append(int(last_logits[i].argmax()))
            items.append(StepItem([s[-1]], slots[i], len(s) - 1, True))
        idx, logits = runner.run(runner.prepare(items))
        for j, row in zip(idx, logits):
            last_logits[j] = row
            torch.testing.assert_close(row, hf_logits(tiny_model, seqs[j])[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides", [{"attention_bias": True}, {"num_key_value_heads": 4}, {"tie_word_embeddings": False}]
)
def test_config_variants_equal_hf(overrides, step_ops):
    """qkv bias, no GQA, untied lm_head."""
    from transformers import LlamaForCausalLM

    from .engine_support import tiny_config as tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    if overrides.get("attention_bias"):
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    proj.bias.normal_()
    runner, kv = make_runner(model, step_ops)
    ids = list(range(5, 17))
    slot = kv.allocate()
    _, logits = runner.run(runner.prepare([StepItem(ids[:-1], slot, 0, True)]))
    torch.testing.assert_close(logits[0], hf_logits(model, ids[:-1])[-1], atol=ATOL, rtol=0)
    _, logits = runner.run(runner.prepare([StepItem(ids[-1:], slot, len(ids) - 1, True)]))
    torch.testing.assert_close(logits[0], hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


def test_llama3_rope_scaling_equals_hf(step_ops):
    from transformers import LlamaForCausalLM

    from .engine_support import tiny_config as tiny_llama_config

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(rope_parameters=rope)).eval()
    runner, kv = make_runner(model, step_ops)
    ids = list(range(3, 60))
    _, logits = runner.run(runner.prepare([StepItem(ids, kv.allocate(), 0, True)]))
    torch.testing.assert_close(logits[0], hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from matryoshka_lora.errors import ConfigError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        fuse_weights(model)


@pytest.mark.parametrize("scaling, alpha", [("none", 1.0), ("sqrt", 2.0)])
def test_mixed_adapters_and_ranks_equal_hf_at_that_rank(tiny_model, tmp_path, step_ops, scaling, alpha):
    """One step holding base, adapter a at ranks 1 and 8, adapter b at rank 3 == HF with the adapter attached."""
    import copy

    from matryoshka_lora.adapters.inject import set_inference_ranks
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.adapters.store import attach_adapter, load_adapter
    from matryoshka_lora.engine.adapter_slots import AdapterSlots, fuse_adapter

    weights = fuse_weights(tiny_model, pack_linear=step_ops.pack_linear)
    slots_table = AdapterSlots(weights.spec, max_adapters=2)
    adapters = {}
    for name, seed, targets in [
        ("a", 1, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        ("b", 2, ("q_proj", "v_proj", "down_proj")),
    ]:
        save_random_adapter(
            tiny_model,
            tmp_path / name,
            name,
            r_max=8,
            scaling=scaling,
            alpha=alpha,
            target_modules=targets,
            seed=seed,
            std=0.2,
        )
        adapter = load_adapter(tmp_path / name)
        adapters[name] = (
            adapter,
            slots_table.install(
                name, adapter.manifest, adapter.path, fuse_adapter(weights.spec, adapter.weights, 8, step_ops.pack_lora)
            ),
        )
    kv = KVCache(weights.spec, 4, 64)
    runner = ModelRunner(weights, kv, slots_table.table, step_ops)
    cases = [(None, 0), ("a", 1), ("a", 8), ("b", 3)]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (6, 4, 7, 5)]
    items = []
    for (name, rank), prompt in zip(cases, prompts):
        entry = adapters[name][1] if name else None
        items.append(
            StepItem(
                prompt, kv.allocate(), 0, True, entry.slot if entry else -1, rank, entry.scale(rank) if entry else 0.0
            )
        )
    idx, logits = runner.run(runner.prepare(items))
    got = dict(zip(idx, logits))
    for i, ((name, rank), prompt) in enumerate(zip(cases, prompts)):
        model = copy.deepcopy(tiny_model)
        if name:
            attach_adapter(model, adapters[name][0])
            set_inference_ranks(model, rank)
        expected = hf_logits(model, prompt)[-1]
        torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=0)
        if name:  # the adapter changes the output (so the test can fail)
            assert not torch.allclose(expected, hf_logits(tiny_model, prompt)[-1], atol=1e-3)


def test_kv_cache_slots_lowest_first_and_lazy():
    from matryoshka_lora.engine.kv_cache import KVCache
    from matryoshka_lora.engine.weights import ModelSpec
    from matryoshka_lora.errors import ConfigError

    kv = KVCache(ModelSpec(2, 8, 2, 1, 4, 16, 32, 1e-5, 64), max_num_seqs=3, max_model_len=16)
    assert [kv.allocate() for _ in range(3)] == [0, 1, 2] and kv.usage() == 1.0
    with pytest.raises(ConfigError):
        kv.allocate()
    kv.free(1), kv.free(0)
    assert kv.allocate() == 0 and kv.num_free_slots == 1
    with pytest.raises(ConfigError):
        kv.free(0) or kv.free(0)  # double free
    assert not kv.cache.any()  # zero-initialised (masked positions must never hold NaN)
