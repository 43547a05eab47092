"""config: every bad setting is refused once, where it enters, naming what was given and what is allowed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest.config import LoadTestConfig, MixEntry, Workload


@pytest.mark.parametrize(
    "overrides, what",
    [
        ({"scenario": "stress"}, "scenario"),
        ({"url": "localhost:8000"}, "--url"),
        ({"scenario": "tenants", "url": "http://127.0.0.1:1"}, "--url"),
        ({"duration_s": 0}, "--duration"),
        ({"users": ()}, "--users"),
        ({"users": (4, 0)}, "--users"),
        ({"ranks": (1, -8)}, "--ranks"),
        ({"max_requests": 0}, "--max-requests"),
        ({"budget_ms": -1.0}, "--budget-ms"),
        ({"budget_unmet": "sometimes"}, "--budget-unmet"),
        ({"rates": (1.0, 0.0)}, "--rates"),
        ({"adapters": ["/nonexistent/adapter"]}, "--adapters"),
        ({"vllm_python": "/nonexistent/python"}, "--vllm-python"),
    ],
)
def test_bad_settings_are_refused(overrides, what, tmp_path):
    values = {"scenario": "rank-sweep", "out": tmp_path, **overrides}
    with pytest.raises(ConfigError) as info:
        LoadTestConfig(**values)
    assert info.value.what == what


@pytest.mark.parametrize("kwargs", [{"prompt_tokens": 0}, {"output_tokens": 1.5}, {"temperature": 3.0}])
def test_bad_workload(kwargs):
    with pytest.raises(ConfigError):
        Workload(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"adapter": "a", "rank": 4, "latency_budget_ms": 100.0},
        {"adapter": None, "rank": 4},
        {"adapter": "a", "weight": 0.0},
    ],
)
def test_bad_mix_entry(kwargs):
    with pytest.raises(ConfigError):
        MixEntry(**kwargs)


def test_defaults_are_the_documented_workload(tmp_path):
    cfg = LoadTestConfig("soak", out=tmp_path)
    assert (cfg.workload.prompt_tokens, cfg.workload.output_tokens, cfg.workload.ignore_eos) == (128, 64, True)
    assert (cfg.users, cfg.phase_s) == ((1, 4, 16), 600.0)
    assert LoadTestConfig("rank-sweep", out=tmp_path, duration_s=5).phase_s == 5


def test_cli_refuses_an_unknown_scenario():
    from matryoshka_lora.cli import app

    result = CliRunner().invoke(app, ["loadtest", "stress", "--out", "/tmp/unused-loadtest-out"])
    assert isinstance(result.exception, ConfigError) and result.exception.given == "stress"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("alpha@8", [("alpha", 8, None, 1.0)]),
        (
            "alpha@1*3, beta@budget=500,base",
            [("alpha", 1, None, 3.0), ("beta", None, 500.0, 1.0), (None, None, None, 1.0)],
        ),
        ("alpha", [("alpha", None, None, 1.0)]),
    ],
)
def test_parse_mix(text, expected):
    from matryoshka_lora.loadtest.plan import parse_mix

    got = [(e["adapter"], e["rank"], e["latency_budget_ms"], e["weight"]) for e in parse_mix(text)]
    assert got == expected


@pytest.mark.parametrize("text", ["", "alpha@x", "base@4", "@4", "alpha@8*0", "alpha@budget=soon"])
def test_parse_mix_refuses(text):
    from matryoshka_lora.loadtest.plan import parse_mix

    with pytest.raises(ConfigError):
        parse_mix(text)
