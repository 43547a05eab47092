"""End to end on the real default model (SmolLM2-135M-Instruct): the chat template reaches the engine,
so the base model answers a simple question correctly; an adapter is served at the rank asked for."""

from __future__ import annotations

import openai
import pytest

from matryoshka_lora.adapters.random_adapter import save_random_adapter
from matryoshka_lora.backends.native import NativeBackend
from matryoshka_lora.engine.config import EngineConfig
from matryoshka_lora.server import ServerSettings, create_app

from .helpers import serving


@pytest.mark.slow
def test_default_model_serves_chat_and_ranks(default_model, tmp_path):
    adapters = tmp_path / "adapters"
    model, _tokenizer = default_model
    save_random_adapter(model, adapters / "smol", "smol", 8, target_modules=("q_proj", "v_proj"), seed=0, std=0.5)
    settings = ServerSettings(model=None, adapters=[adapters], max_num_seqs=4, max_output_tokens=32)
    # no cost-model warm-up: it times dozens of real-model steps, and this test asks for no budget
    backend = NativeBackend(EngineConfig(model=None, adapters=[str(adapters)], max_num_seqs=4, warmup=False))
    with serving(create_app(settings, backend=backend), ready_timeout_s=300) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        ids = [m.id for m in client.models.list()]
        assert ids == ["SmolLM2-135M-Instruct", "smol", "smol@1", "smol@2", "smol@4", "smol@8"]
        question = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
        base = client.chat.completions.create(model=ids[0], messages=question, max_tokens=8, temperature=0)
        assert "paris" in base.choices[0].message.content.lower()
        assert base.model_extra["matryoshka"]["rank"] == 0
        ranked = client.chat.completions.create(model="smol@2", messages=question, max_tokens=8, temperature=0)
        assert ranked.model_extra["matryoshka"]["rank"] == 2 and ranked.usage.completion_tokens >= 1
