"""Prometheus metrics after known traffic are exactly right (fresh server on the real native engine)."""

from __future__ import annotations

import httpx
import pytest

from matryoshka_lora.server import create_app

from .conftest import native_settings
from .helpers import auth, metric_samples, serving, write_tenants


@pytest.fixture(scope="module")
def fresh(tiny_model_dir, tiny_adapters, tmp_path_factory):
    tenants = write_tenants(tmp_path_factory.mktemp("metrics") / "tenants.toml", ["alpha"])
    with serving(create_app(native_settings(tiny_model_dir, tiny_adapters, tenants))) as url:
        yield url


def test_counters_and_histograms_after_known_traffic(fresh):
    c = httpx.Client(base_url=fresh, timeout=60)
    answers = []
    for rank in (2, 2, 2, 4):
        answers.append(
            c.post(
                "/generate",
                json={"prompt": "one two", "adapter": "alpha", "rank": rank, "max_tokens": 5},
                headers=auth("root"),
            ).json()
        )
    answers.append(
        c.post(
            "/generate",
            json={"prompt": "three", "adapter": "alpha", "latency_budget_ms": 1e9, "max_tokens": 5},
            headers=auth("root"),
        ).json()
    )
    answers.append(
        c.post(
            "/v1/completions",
            json={"model": c.get("/ready").json()["model"], "prompt": "four", "max_tokens": 5},
            headers=auth("root"),
        ).json()
    )
    assert c.post("/generate", json={"prompt": "x", "adapter": "nope"}, headers=auth("root")).status_code == 404
    assert c.post("/generate", json={"prompt": "x", "adapter": "alpha"}).status_code == 401
    assert (
        c.post("/generate", json={"prompt": "x", "adapter": "alpha", "rank": 99}, headers=auth("root")).status_code
        == 422
    )
    assert c.get("/v1/models", headers=auth("root")).status_code == 200  # not a generation request: not counted
    samples = metric_samples(c.get("/metrics").text)

    def family(name: str) -> dict[tuple, float]:
        return {labels: v for (n, labels), v in samples.items() if n == name}

    assert family("matryoshka_requests_total") == {
        (("adapter", "alpha"), ("rank", "2"), ("status", "200")): 3.0,
        (("adapter", "alpha"), ("rank", "4"), ("status", "200")): 1.0,
        (("adapter", "alpha"), ("rank", "8"), ("status", "200")): 1.0,
        (("adapter", "base"), ("rank", "0"), ("status", "200")): 1.0,
        (("adapter", "unknown"), ("rank", "none"), ("status", "404")): 1.0,
        (("adapter", "unknown"), ("rank", "none"), ("status", "401")): 1.0,
        (("adapter", "alpha"), ("rank", "none"), ("status", "422")): 1.0,
    }
    expected_counts = {("alpha", "2"): 3, ("alpha", "4"): 1, ("alpha", "8"): 1, ("base", "0"): 1}
    for name in (
        "matryoshka_request_latency_seconds",
        "matryoshka_queue_time_seconds",
        "matryoshka_time_to_first_token_seconds",
    ):
        counts = {(dict(k)["adapter"], dict(k)["rank"]): v for k, v in family(f"{name}_count").items()}
        assert counts == expected_counts, name
        infs = {
            (dict(k)["adapter"], dict(k)["rank"]): v
            for k, v in family(f"{name}_bucket").items()
            if dict(k)["le"] == "+Inf"
        }
        assert infs == expected_counts, name
    generation = {("alpha", "2"): 0, ("alpha", "4"): 0, ("alpha", "8"): 0, ("base", "0"): 0}
    prompt = dict(generation)
    multi = dict(generation)
    labels = [("alpha", "2")] * 3 + [("alpha", "4"), ("alpha", "8"), ("base", "0")]
    for key, answer in zip(labels, answers):
        usage = answer.get("usage")
        n_out = usage["completion_tokens"] if usage else answer["num_output_tokens"]
        generation[key] += n_out
        prompt[key] += usage["prompt_tokens"] if usage else answer["num_prompt_tokens"]
        multi[key] += n_out > 1
    as_map = lambda fam: {(dict(k)["adapter"], dict(k)["rank"]): v for k, v in family(fam).items()}  # noqa: E731
    assert as_map("matryoshka_generation_tokens_total") == generation
    assert as_map("matryoshka_prompt_tokens_total") == prompt
    assert as_map("matryoshka_time_per_output_token_seconds_count") == {k: v for k, v in multi.items() if v}
    assert family("matryoshka_budget_requests_total") == {(("adapter", "alpha"), ("outcome", "hit")): 1.0}
    assert samples[("matryoshka_num_requests_running", ())] == 0
    assert samples[("matryoshka_num_requests_waiting", ())] == 0
    assert samples[("matryoshka_adapters_loaded", ())] == 2
    assert samples[("matryoshka_budget_latency_margin", ())] == 1.0  # one promised request: too few to learn from
    assert samples[("vllm:num_requests_running", ())] == 0 and samples[("vllm:num_requests_waiting", ())] == 0
    assert 0 <= samples[("vllm:kv_cache_usage_perc", ())] == samples[("matryoshka_kv_cache_usage_ratio", ())] <= 1
    ((info_labels, stamp),) = family("vllm:lora_requests_info").items()
    assert dict(info_labels) == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert stamp > 1.7e9  # a Unix timestamp, as vLLM reports it
