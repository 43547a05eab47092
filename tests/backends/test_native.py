"""NativeBackend: the EngineBackend protocol over the native engine (tiny random Llama, loop thread running)."""

from __future__ import annotations

import asyncio

import pytest

from matryoshka_lora.errors import (
    EngineStoppedError,
    InvalidRankError,
    UnknownAdapterError,
)
from matryoshka_lora.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, tmp_path_factory):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    model, _ = load_base_model(tiny_model_dir)
    root = tmp_path_factory.mktemp("native-adapters")
    save_random_adapter(model, root / "served" / "alpha", "alpha", 8, seed=1, std=0.3)
    save_random_adapter(model, root / "extra", "extra", 4, seed=2, std=0.3)
    return root


def backend_for(tiny_model_dir, adapters_dir, **overrides):
    from matryoshka_lora.backends.native import NativeBackend
    from matryoshka_lora.engine.config import EngineConfig

    values = {
        "model": str(tiny_model_dir),
        "adapters": [str(adapters_dir / "served")],
        "max_num_seqs": 4,
        "max_model_len": 256,
        "num_threads": 1,
        "warmup": True,
    }
    values.update(overrides)
    return NativeBackend(EngineConfig(**values))


def req(i, adapter="alpha", rank=None, max_tokens=8, budget=None, prompt=(5, 6, 7)):
    return GenerationRequest(
        f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), adapter, rank, latency_budget_ms=budget
    )


async def collect(backend, request):
    return [e async for e in backend.generate(request)]


def test_generate_streams_and_reports(tiny_model_dir, adapters_dir):
    async def main():
        backend = backend_for(tiny_model_dir, adapters_dir)
        assert not backend.ready
        await backend.start()
        assert backend.ready and [a.name for a in backend.list_adapters()] == ["alpha"]
        results = await asyncio.gather(
            *(collect(backend, req(i, *case)) for i, case in enumerate([("alpha", 2), ("alpha", None), (None, None)]))
        )
        await backend.shutdown(5.0)
        return results

    results = asyncio.run(main())
    for events, (rank, reason) in zip(results, [(2, "requested"), (8, "default"), (0, "base")]):
        assert [e.rank for e in events] == [rank] * 8 and events[0].rank_reason == reason
        assert sum(len(e.token_ids) for e in events) == 8
        last = events[-1]
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 8
        assert 0 <= last.queue_s <= last.ttft_s <= last.total_s


def test_errors_raise_at_generate_and_close_aborts(tiny_model_dir, adapters_dir):
    async def main():
        backend = backend_for(tiny_model_dir, adapters_dir, warmup=False)
        await backend.start()
        with pytest.raises(UnknownAdapterError):
            backend.generate(req(0, "missing", 1))
        with pytest.raises(InvalidRankError):
            backend.generate(req(0, "alpha", 9))
        stream = backend.generate(req(1, "alpha", 8, max_tokens=200))
        first = await anext(stream)
        await stream.aclose()  # the client went away
        for _ in range(200):
            if backend.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        stats = backend.stats()
        # dropping a stream without closing it aborts too
        dropped = backend.generate(req(2, "alpha", 8, max_tokens=200))
        await anext(dropped)
        del dropped
        for _ in range(200):
            if backend.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        await backend.shutdown(1.0)
        with pytest.raises(EngineStoppedError):
            backend.generate(req(3))
        return first, stats, backend.stats()

    first, stats, after = asyncio.run(main())
    assert not first.finished
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
    assert after.num_running == 0


def test_latency_budget_picks_rank(tiny_model_dir, adapters_dir):
    async def main():
        backend = backend_for(tiny_model_dir, adapters_dir)
        await backend.start()
        generous = await collect(backend, req(0, budget=60_000.0))
        impossible = await collect(backend, req(1, budget=1e-6))
        await backend.shutdown(5.0)
        return generous, impossible

    generous, impossible = asyncio.run(main())
    assert (generous[0].rank, generous[0].rank_reason) == (8, "budget")
    assert (impossible[0].rank, impossible[0].rank_reason) == (1, "budget_unmet")
    assert generous[-1].predicted_latency_s > 0 and impossible[-1].predicted_latency_s > 0


def test_hot_load_unload_and_drain(tiny_model_dir, adapters_dir):
    async def main():
        backend = backend_for(tiny_model_dir, adapters_dir, warmup=False)
        await backend.start()
        running = asyncio.create_task(collect(backend, req(0, "alpha", 8, max_tokens=40)))
        await asyncio.sleep(0.05)
        info = await backend.load_adapter(str(adapters_dir / "extra"))
        extra = await collect(backend, req(1, "extra", 4))
        await backend.unload_adapter("alpha")
        with pytest.raises(UnknownAdapterError):
            backend.generate(req(2, "alpha", 1))
        names = [a.name for a in backend.list_adapters()]
        late = asyncio.create_task(collect(backend, req(3, "extra", 2, max_tokens=30)))
        await asyncio.sleep(0.05)
        await backend.shutdown(30.0)  # drains the in-flight ones
        return info, extra, names, await running, await late

    info, extra, names, alpha_events, late = asyncio.run(main())
    assert (info.name, info.r_max) == ("extra", 4) and names == ["extra"]
    assert extra[-1].finish_reason == "length"
    assert alpha_events[-1].finish_reason == "length" and alpha_events[-1].num_output_tokens == 40
    assert late[-1].finish_reason == "length" and late[-1].num_output_tokens == 30


def test_encode_prompt(tiny_model_dir, adapters_dir):
    async def main():
        backend = backend_for(tiny_model_dir, adapters_dir, warmup=False)
        await backend.start()
        try:
            tok = backend.engine.tokenizer
            raw = backend.encode_prompt("Hello there", None)
            chat = backend.encode_prompt(None, [{"role": "user", "content": "Hi"}])
            return tok, raw, chat
        finally:
            await backend.shutdown(1.0)

    tok, raw, chat = asyncio.run(main())
    assert tok.decode(raw) == "Hello there"
    assert "Hi" in tok.decode(chat) and len(chat) > 3


def test_the_engine_is_built_warmed_up_and_stepped_on_one_thread(tiny_model_dir, adapters_dir, monkeypatch):
    """Every torch op of the model runs on one thread (one OpenMP pool in the process); a hot load runs on
    a thread of its own that ends with it."""
    import threading

    from matryoshka_lora.engine import engine

    seen: dict[str, set[int]] = {"init": set(), "warmup": set(), "step": set(), "load": set()}
    real_init, real_warmup = engine.LLMEngine.__init__, engine.LLMEngine.warmup
    real_step, real_load = engine.LLMEngine.step, engine.LLMEngine.load_adapter

    def spy(key, fn):
        def wrapped(*args, **kwargs):
            seen[key].add(threading.get_ident())
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(engine.LLMEngine, "__init__", spy("init", real_init))
    monkeypatch.setattr(engine.LLMEngine, "warmup", spy("warmup", real_warmup))
    monkeypatch.setattr(engine.LLMEngine, "step", spy("step", real_step))

    async def main():
        backend = backend_for(tiny_model_dir, adapters_dir)
        await backend.start()
        monkeypatch.setattr(engine.LLMEngine, "load_adapter", spy("load", real_load))
        await backend.load_adapter(str(adapters_dir / "extra"))
        async for _ in backend.generate(req(0)):
            pass
        await backend.shutdown(5.0)

    asyncio.run(main())
    (model_thread,) = seen["init"]
    assert seen["warmup"] == seen["step"] == {model_thread}
    (loader,) = seen["load"]
    assert loader not in (model_thread, threading.get_ident())
    assert loader not in {t.ident for t in threading.enumerate()}  # it ended with the load
