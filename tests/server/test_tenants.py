"""Tenants file parsing, validation and bearer authentication."""

from __future__ import annotations

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.server.errors import AuthenticationError
from matryoshka_lora.server.tenants import (
    OPEN_TENANT,
    TenantRegistry,
    hash_key,
    load_tenants,
)

H1, H2 = hash_key("k1"), hash_key("k2")


def test_hash_key_is_sha256_hex():
    # echo -n secret | sha256sum
    assert hash_key("secret") == "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"


@pytest.mark.parametrize(
    "suffix,text",
    [
        (
            ".toml",
            f'[tenants.a]\napi_key_sha256 = "{H1}"\nadapters = ["x", "y"]\nmax_rank = 8\n'
            f'rate_limit_rps = 2.5\nmax_concurrency = 3\n[tenants.b]\napi_key_sha256 = "{H2}"\nadmin = true\n',
        ),
        (
            ".yaml",
            f'tenants:\n  a:\n    api_key_sha256: "{H1}"\n    adapters: [x, y]\n    max_rank: 8\n'
            f'    rate_limit_rps: 2.5\n    max_concurrency: 3\n  b:\n    api_key_sha256: "{H2}"\n    admin: true\n',
        ),
    ],
)
def test_load_tenants_toml_and_yaml_agree(tmp_path, suffix, text):
    path = tmp_path / f"tenants{suffix}"
    path.write_text(text)
    a, b = load_tenants(path)
    assert (a.name, a.adapters, a.max_rank, a.rate_limit_rps, a.burst, a.max_concurrency, a.admin) == (
        "a",
        frozenset({"x", "y"}),
        8,
        2.5,
        3,
        3,
        False,
    )
    assert (b.name, b.adapters, b.admin, b.rate_limit_rps) == ("b", None, True, None)
    assert a.may_use("x") and not a.may_use("z") and a.may_use(None) and b.may_use("anything")


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[tenants.a]\napi_key_sha256 = "nothex"\n', "api_key_sha256"),
        (f'[tenants.a]\napi_key_sha256 = "{H1}"\nmax_rank = 0\n', "max_rank"),
        (f'[tenants.a]\napi_key_sha256 = "{H1}"\nrate_limit_rps = -1\n', "rate_limit_rps"),
        (f'[tenants.a]\napi_key_sha256 = "{H1}"\nadapters = "some"\n', "adapters"),
        (f'[tenants.a]\napi_key_sha256 = "{H1}"\ncolour = "red"\n', "colour"),
        (f'[tenants.a]\napi_key_sha256 = "{H1}"\n[tenants.b]\napi_key_sha256 = "{H1}"\n', "one key per tenant"),
        ("[tenants]\n", "non-empty `tenants` table"),
        ("tenants = 3\n", "non-empty `tenants` table"),
        (f'[other]\nx = 1\n[tenants.a]\napi_key_sha256 = "{H1}"\n', "only the `tenants` table"),
        ("[tenants.a\n", "unparsable TOML"),
    ],
)
def test_bad_tenants_files_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_tenants(path)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "header,tenant,error",
    [
        ("Bearer k1", "a", None),
        ("bearer   k2", "b", None),
        (None, None, "missing API key"),
        ("", None, "missing API key"),
        ("Basic k1", None, "malformed"),
        ("Bearer ", None, "malformed"),
        ("Bearer k3", None, "invalid API key"),
    ],
)
def test_authenticate(tmp_path, header, tenant, error):
    path = tmp_path / "t.toml"
    path.write_text(f'[tenants.a]\napi_key_sha256 = "{H1}"\n[tenants.b]\napi_key_sha256 = "{H2}"\n')
    registry = TenantRegistry(load_tenants(path))
    if error is None:
        assert registry.authenticate(header).name == tenant
    else:
        with pytest.raises(AuthenticationError, match=error):
            registry.authenticate(header)


def test_open_registry_lets_everyone_in_as_admin():
    registry = TenantRegistry(None)
    assert registry.is_open
    assert registry.authenticate(None) is OPEN_TENANT and OPEN_TENANT.admin and OPEN_TENANT.may_use("x")


def test_the_example_tenants_file_loads_and_its_documented_keys_match():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "tenants.example.toml"
    registry = TenantRegistry(load_tenants(path))
    support = registry.authenticate("Bearer change-me-support")
    assert (support.name, support.max_rank, support.adapters) == ("support", 16, frozenset({"support-bot"}))
    assert registry.authenticate("Bearer change-me-research").name == "research"
    assert registry.authenticate("Bearer change-me-admin").admin
