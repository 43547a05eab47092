"""ServerSettings: defaults, env, overrides, and the refusal of an open server on a public address."""

from __future__ import annotations

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.server.settings import is_loopback, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    import os

    for name in [n for n in os.environ if n.startswith("MATRYOSHKA_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./adapters here


def test_defaults():
    s = load_settings()
    assert (s.host, s.port, s.model, s.adapters, s.tenants, s.backend) == ("127.0.0.1", 8000, None, [], None, "native")


def test_default_adapters_dir_when_present(tmp_path):
    (tmp_path / "adapters").mkdir()
    assert [str(p) for p in load_settings().adapters] == ["adapters"]


def test_env_then_flags(monkeypatch, tmp_path):
    (tmp_path / "a1").mkdir()
    (tmp_path / "a2").mkdir()
    monkeypatch.setenv("MATRYOSHKA_PORT", "9001")
    monkeypatch.setenv("MATRYOSHKA_MAX_NUM_SEQS", "4")
    monkeypatch.setenv("MATRYOSHKA_ADAPTERS", "a1, a2")
    s = load_settings()
    assert (s.port, s.max_num_seqs, [str(p) for p in s.adapters]) == (9001, 4, ["a1", "a2"])
    s = load_settings(port=9002, max_num_seqs=None)  # None = flag not given
    assert (s.port, s.max_num_seqs) == (9002, 4)
    monkeypatch.setenv("MATRYOSHKA_BUDGET_LAYERS_OFF", " typical ")
    assert load_settings().budget_layers_off == ["typical"]
    monkeypatch.setenv("MATRYOSHKA_BUDGET_LAYERS_OFF", "typical,headroom")
    assert load_settings().budget_layers_off == ["typical", "headroom"]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(port=70000), "port"),
        (dict(backend="tgi"), "backend"),
        (dict(budget_unmet="drop"), "budget_unmet"),
        (dict(adapter_dtype="float16"), "adapter_dtype"),
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
        (dict(budget_layers_off=["cache"]), "budget_layers_off"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(adapters=["missing-dir"]), "adapter directories not found"),
        (dict(tenants="missing.toml"), "tenants file not found"),
        (dict(host="0.0.0.0"), "host without a tenants file"),
        (dict(colour="red"), "colour"),
    ],
)
def test_bad_settings(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(**overrides)


def test_public_host_needs_tenants_or_allow_open(tmp_path):
    tenants = tmp_path / "t.toml"
    tenants.write_text("")
    assert load_settings(host="0.0.0.0", allow_open=True).allow_open
    assert load_settings(host="0.0.0.0", tenants=str(tenants)).tenants.name == "t.toml"


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("::", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_other_matryoshka_env_vars_and_empty_ones_are_ignored(monkeypatch):
    monkeypatch.setenv("MATRYOSHKA_CACHE", "/tmp/cache")  # models.py's, set by the Dockerfile
    monkeypatch.setenv("MATRYOSHKA_ADAPTERS_DIR", "/adapters")  # the vLLM plugin's
    monkeypatch.setenv("MATRYOSHKA_TENANTS", "")  # compose passes unset variables as empty
    s = load_settings()
    assert (s.tenants, s.adapters) == (None, [])


@pytest.mark.parametrize(
    "overrides, access_log, log_level",
    [
        ({}, True, "info"),
        ({"access_log": False}, False, "info"),
        ({"log_level": "WARNING"}, True, "warning"),
    ],
)
def test_uvicorn_config_follows_the_settings(overrides, access_log, log_level):
    from matryoshka_lora.server.run import uvicorn_config

    config = uvicorn_config(object(), load_settings(port=9003, drain_timeout_s=2.5, **overrides))
    assert (config.access_log, config.log_level, config.port, config.timeout_graceful_shutdown) == (
        access_log,
        log_level,
        9003,
        3,
    )
