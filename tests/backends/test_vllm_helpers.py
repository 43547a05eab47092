"""The vLLM backend's pure helpers (no vLLM needed): LoRA names, max_lora_rank, the stable id map, the
slice cache, the rank table, the CPU environment, backend choice."""

from __future__ import annotations

import json

import pytest

from matryoshka_lora.backends import vllm_env
from matryoshka_lora.backends.vllm_adapters import ServedAdapter
from matryoshka_lora.backends.vllm_loras import LoraIdMap, export_slice, parse_lora_name, vllm_max_lora_rank
from matryoshka_lora.backends.vllm_ranks import RankLatencyTable, resolve_rank
from matryoshka_lora.backends.vllm_stats import adapter_names
from matryoshka_lora.errors import BudgetUnmetError, ConfigError, InvalidRankError, UnknownAdapterError
from matryoshka_lora.types import GenerationRequest, SamplingParams


@pytest.mark.parametrize(
    "r_max, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (33, 64), (300, 320), (512, 512)]
)
def test_max_lora_rank_rounds_up_to_a_vllm_size(r_max, expected):
    assert vllm_max_lora_rank(r_max) == expected


@pytest.mark.parametrize("r_max", [0, 513, 2.0, True])
def test_max_lora_rank_refuses(r_max):
    with pytest.raises(ConfigError):
        vllm_max_lora_rank(r_max)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("add3@8", ("add3", 8)),
        ("add3", ("add3", None)),
        ("a@b@4", ("a@b", 4)),
        ("my.adapter-1@16", ("my.adapter-1", 16)),
    ],
)
def test_parse_lora_name(name, expected):
    assert parse_lora_name(name) == expected


@pytest.mark.parametrize("name", ["add3@", "@4", "add3@x", "add3@-1", "add3@1.5"])
def test_parse_lora_name_refuses(name):
    with pytest.raises(ConfigError):
        parse_lora_name(name)


def test_lora_id_map_is_stable_distinct_and_deterministic():
    first, second = LoraIdMap(), LoraIdMap()
    keys = [("add3", r, "d1") for r in (1, 2, 4, 8)] + [("sort5", 4, "d1"), ("add3", 4, "d2")]
    ids = [first.id_for(k) for k in keys]
    assert len(set(ids)) == len(keys) and all(1 <= i < 2**31 for i in ids)
    assert [first.id_for(k) for k in keys] == ids  # stable
    assert [second.id_for(k) for k in keys] == ids  # the same in another process / instance
    assert sorted(first.forget("add3")) == sorted(ids[:4] + ids[5:])
    assert len(first) == 1 and first.id_for(("sort5", 4, "d1")) == ids[4]


def test_lora_id_map_resolves_collisions(monkeypatch):
    import matryoshka_lora.backends.vllm_loras as loras

    monkeypatch.setattr(loras.zlib, "crc32", lambda data: 41)  # every key hashes alike
    ids = LoraIdMap()
    assert [ids.id_for(("a", r, "d")) for r in (1, 2, 3)] == [42, 43, 44]
    assert ids.id_for(("a", 2, "d")) == 43


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    model, _ = load_base_model(tiny_model_dir)
    return save_random_adapter(model, tmp_path_factory.mktemp("vllm-helpers") / "tiny8", "tiny8", 8, seed=3, std=0.3)


def test_export_slice_caches_per_rank_and_version(tiny_adapter, tmp_path):
    from safetensors.torch import load_file

    from matryoshka_lora.adapters.store import load_adapter, save_adapter

    out4 = export_slice(tiny_adapter, "tiny8", 4, tmp_path)
    assert out4.name.startswith("tiny8@4-") and json.loads((out4 / "adapter_config.json").read_text())["r"] == 4
    mtime = (out4 / "adapter_model.safetensors").stat().st_mtime_ns
    assert export_slice(tiny_adapter, "tiny8", 4, tmp_path) == out4  # cached, not rewritten
    assert (out4 / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    adapter = load_adapter(tiny_adapter)
    path = next(iter(adapter.weights))
    assert load_file(str(out4 / "adapter_model.safetensors"))[f"base_model.model.{path}.lora_A.weight"].shape[0] == 4
    save_adapter(tiny_adapter, adapter.manifest, {k: (a, 2 * b) for k, (a, b) in adapter.weights.items()})
    assert export_slice(tiny_adapter, "tiny8", 4, tmp_path) != out4  # replaced adapter -> fresh export
    with pytest.raises(InvalidRankError):
        export_slice(tiny_adapter, "tiny8", 9, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


ADAPTERS = {"add3": ServedAdapter("add3", "/x/add3", 16, (1, 2, 4, 8, 16), "d")}


def request(adapter="add3", rank=None, budget=None, max_rank=None, refuse=False):
    return GenerationRequest(
        "r", (1, 2, 3), SamplingParams(max_tokens=10), adapter, rank, budget, max_rank, refuse_unmet_budget=refuse
    )


@pytest.mark.parametrize(
    "kwargs, rank, reason",
    [
        (dict(adapter=None), 0, "base"),
        (dict(adapter=None, rank=0), 0, "base"),
        (dict(rank=4), 4, "requested"),
        (dict(rank=16), 16, "requested"),
        (dict(), 16, "default"),
        (dict(max_rank=6), 6, "default"),
        (dict(budget=10_000), 16, "budget"),  # prior: 0.1 + 9 * 0.03 = 0.37 s fits
        (dict(budget=10_000, max_rank=6), 4, "budget"),  # the highest train rank under the cap
        (dict(budget=1), 1, "budget_unmet"),
        (dict(budget=10_000, refuse=True), 16, "budget"),  # refusing changes nothing when a rank fits
        (dict(rank=16, refuse=True), 16, "requested"),
    ],
)
def test_resolve_rank(kwargs, rank, reason):
    choice = resolve_rank(request(**kwargs), ADAPTERS, RankLatencyTable(), max_tokens=10)
    assert (choice.rank, choice.reason) == (rank, reason)
    assert (choice.predicted_s is not None) == reason.startswith("budget")


def test_resolve_rank_refuses_an_unmet_budget_when_asked():
    with pytest.raises(BudgetUnmetError) as info:
        resolve_rank(request(budget=1, refuse=True), ADAPTERS, RankLatencyTable(), max_tokens=10)
    assert (info.value.budget_ms, info.value.rank) == (1, 1)
    assert info.value.predicted_ms == pytest.approx(370.0)  # the prior: 0.1 + 9 x 0.03 s
    assert info.value.retry_after_s == 1.0  # at least a second


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(rank=17), InvalidRankError),
        (dict(rank=0), InvalidRankError),
        (dict(rank=5, max_rank=4), InvalidRankError),
        (dict(adapter=None, rank=2), InvalidRankError),
        (dict(adapter="nope"), UnknownAdapterError),
        (dict(rank=2, budget=100), ConfigError),
        (dict(budget=0), ConfigError),
        (dict(max_rank=0), ConfigError),
    ],
)
def test_resolve_rank_refuses(kwargs, error):
    with pytest.raises(error):
        resolve_rank(request(**kwargs), ADAPTERS, RankLatencyTable(), max_tokens=10)


def test_rank_table_learns_from_finished_requests():
    table = RankLatencyTable(prior_ttft_s=0.1, prior_tpot_s=0.03, weight=0.5)
    assert table.predict(8, 11) == pytest.approx(0.1 + 10 * 0.03)
    table.observe(8, ttft_s=0.2, num_output_tokens=11, total_s=1.2)  # first observation replaces the prior
    assert table.predict(8, 11) == pytest.approx(0.2 + 10 * 0.1)
    assert table.predict(2, 11) == pytest.approx(1.2)  # unseen rank: every rank's mean
    table.observe(8, ttft_s=0.4, num_output_tokens=1, total_s=0.4)  # one token: no tpot sample
    assert table.predict(8, 11) == pytest.approx(0.3 + 10 * 0.1)
    # a budget between the two ranks' predictions picks the rank that fits
    table.observe(16, ttft_s=1.0, num_output_tokens=11, total_s=3.0)
    choice = resolve_rank(request(budget=1500), ADAPTERS, table, max_tokens=11)
    assert (choice.rank, choice.reason) == (8, "budget")


def test_adapter_names_of_lora_names():
    assert adapter_names(("add3@8", "add3@2", "sort5@4", "weird@")) == ("add3", "sort5", "weird@")


@pytest.mark.parametrize("cpus, expected", [([0], "0"), ([0, 1], "0-1"), ([0, 1, 2, 5], "0-2,5"), ([1, 3, 4], "1,3-4")])
def test_cpu_list(cpus, expected):
    assert vllm_env._cpu_list(cpus) == expected


def test_prepare_cpu_env_sets_only_what_is_unset(monkeypatch):
    monkeypatch.setattr(vllm_env, "allowed_cpus", lambda: [0, 1, 2, 3])
    libs = ["/lib/libtcmalloc_minimal.so.4", "/v/lib/libiomp5.so"]
    monkeypatch.setattr(vllm_env, "find_preload_libs", lambda prefix=None: libs)
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "LD_PRELOAD": "/other.so"}
    changed = vllm_env.prepare_cpu_env(num_threads=2, environ=env)
    assert env == {
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4:/v/lib/libiomp5.so:/other.so",
    }
    assert set(changed) == {"VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD"}
    assert vllm_env.prepare_cpu_env(num_threads=2, environ=env) == {}  # idempotent
    with pytest.raises(ConfigError):
        vllm_env.prepare_cpu_env(num_threads=0, environ={})


@pytest.mark.parametrize(
    "importable, cpu_build, cuda, expected",
    [
        (False, False, True, "native"),
        (True, True, True, "native"),
        (True, False, False, "native"),
        (True, False, True, "vllm"),
    ],
)
def test_choose_backend_auto(monkeypatch, importable, cpu_build, cuda, expected):
    monkeypatch.setattr(vllm_env, "vllm_importable", lambda: importable)
    monkeypatch.setattr(vllm_env, "is_cpu_build", lambda: cpu_build)
    monkeypatch.setattr(vllm_env, "cuda_available", lambda: cuda)
    assert vllm_env.choose_backend("auto") == expected
    assert vllm_env.choose_backend("native") == "native"


def test_choose_backend_refuses(monkeypatch):
    monkeypatch.setattr(vllm_env, "vllm_importable", lambda: False)
    with pytest.raises(ConfigError):
        vllm_env.choose_backend("vllm")
    with pytest.raises(ConfigError):
        vllm_env.choose_backend("tgi")


def test_vllm_config_validates():
    from matryoshka_lora.backends.vllm_backend import VLLMConfig

    assert VLLMConfig(adapters=["a"]).adapters == ["a"]
    for bad in (dict(max_loras=0), dict(max_lora_rank=1000), dict(dtype="int8"), dict(base_check="weights")):
        with pytest.raises(ConfigError):
            VLLMConfig(**bad)


def test_config_from_server_settings():
    from matryoshka_lora.backends.vllm_backend import VLLMBackend
    from matryoshka_lora.server.settings import load_settings

    settings = load_settings(
        max_loras=3,
        max_num_seqs=5,
        max_queue_len=7,
        max_model_len=300,
        num_threads=1,
        seed=9,
        adapters=[],
        backend="vllm",
    )
    config = VLLMBackend.from_settings(settings).config
    assert (
        config.max_loras,
        config.max_num_seqs,
        config.max_queue_len,
        config.max_model_len,
        config.num_threads,
        config.seed,
        config.adapters,
        config.model,
    ) == (3, 5, 7, 300, 1, 9, [], None)
