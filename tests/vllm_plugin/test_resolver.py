"""MatryoshkaResolver on its own (no server): "ADAPTER@RANK" -> an exported PEFT slice, refusals -> None.

Needs vLLM in the running interpreter (CI: .venv-vllm from `bash .ci/vllm_deps.sh`); skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (bash .ci/vllm_deps.sh sets up .venv-vllm)")


@pytest.fixture(scope="module")
def adapters_root(tiny_model_dir, tmp_path_factory):
    """Two tiny random adapters in one folder (directory names differ from adapter names on purpose)."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    model, _ = load_base_model(tiny_model_dir)
    root = tmp_path_factory.mktemp("resolver-adapters")
    save_random_adapter(model, root / "dir-one", "one", 8, seed=1, std=0.3)
    save_random_adapter(model, root / "dir-two", "two", 4, seed=2, std=0.3)
    (root / "not-an-adapter").mkdir()
    return root


@pytest.fixture
def resolver(adapters_root, tmp_path):
    from matryoshka_lora.vllm_plugin.resolver import MatryoshkaResolver

    return MatryoshkaResolver(adapters_root, cache_dir=tmp_path / "cache")


def resolve(resolver, base, name):
    return asyncio.run(resolver.resolve_lora(str(base), name))


@pytest.mark.parametrize("name, rank", [("one@1", 1), ("one@4", 4), ("one@8", 8), ("two@4", 4), ("one", 8), ("two", 4)])
def test_resolves_adapter_at_rank_to_a_peft_slice(resolver, tiny_model_dir, name, rank):
    from safetensors.torch import load_file

    lora = resolve(resolver, tiny_model_dir, name)
    assert lora is not None and lora.lora_name == name and lora.lora_int_id >= 1
    config = json.loads((resolver.cache_dir / lora.lora_path.rsplit("/", 1)[-1] / "adapter_config.json").read_text())
    assert config["r"] == rank and config["peft_type"] == "LORA"
    tensors = load_file(f"{lora.lora_path}/adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {rank}


@pytest.mark.parametrize("name", ["one@0", "one@9", "two@5", "nope@2", "nope", "one@x", "@4", "not-an-adapter@1"])
def test_refuses_bad_ranks_and_unknown_adapters(resolver, tiny_model_dir, name, caplog):
    with caplog.at_level("INFO", logger="matryoshka_lora.vllm_plugin.resolver"):
        assert resolve(resolver, tiny_model_dir, name) is None
    assert caplog.records  # every refusal says why
    assert not (resolver.cache_dir.exists() and any(resolver.cache_dir.iterdir()))


def test_refuses_another_base_model_unless_told(resolver, monkeypatch):
    assert resolve(resolver, "/models/SomeOtherModel", "one@2") is None
    monkeypatch.setenv("MATRYOSHKA_SKIP_BASE_CHECK", "1")
    assert resolve(resolver, "/models/SomeOtherModel", "one@2") is not None


def test_ids_are_stable_and_adapters_added_later_are_found(resolver, tiny_model_dir, adapters_root):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    first = [resolve(resolver, tiny_model_dir, n).lora_int_id for n in ("one@2", "one@4", "two@2")]
    assert len(set(first)) == 3
    assert [resolve(resolver, tiny_model_dir, n).lora_int_id for n in ("one@2", "one@4", "two@2")] == first
    assert resolve(resolver, tiny_model_dir, "three@2") is None
    model, _ = load_base_model(tiny_model_dir)
    save_random_adapter(model, adapters_root / "dir-three", "three", 2, seed=3)
    try:
        assert resolve(resolver, tiny_model_dir, "three@2") is not None
    finally:
        import shutil

        shutil.rmtree(adapters_root / "dir-three")


@pytest.fixture
def package_logger():
    """register() may set up the package logger (as inside `vllm serve`): restore it afterwards."""
    import logging

    logger = logging.getLogger("matryoshka_lora")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


@pytest.mark.parametrize("env, registered", [(None, False), ("dir", True), ("missing", False)])
def test_register_follows_the_environment(monkeypatch, package_logger, adapters_root, tmp_path, env, registered):
    from vllm.lora.resolver import LoRAResolverRegistry

    from matryoshka_lora.vllm_plugin import ADAPTERS_DIR_ENV, RESOLVER_NAME, register

    values = {None: None, "dir": str(adapters_root), "missing": str(tmp_path / "missing")}
    if values[env] is None:
        monkeypatch.delenv(ADAPTERS_DIR_ENV, raising=False)
    else:
        monkeypatch.setenv(ADAPTERS_DIR_ENV, values[env])
    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    register()
    register()  # vLLM loads plugins in several processes, and may call twice in one
    assert (RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers()) == registered


def test_the_entry_point_is_installed():
    from importlib.metadata import entry_points

    [entry] = [e for e in entry_points(group="vllm.general_plugins") if e.name == "matryoshka_lora"]
    assert entry.value == "matryoshka_lora.vllm_plugin:register"
