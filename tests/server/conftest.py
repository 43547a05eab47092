"""Fixtures of the server tests: tenants files, tiny random adapters, and a real server on the native
engine (tiny random Llama from tests/conftest.py) shared by the tests of a session."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import save_tiny_adapter, serving, write_tenants

ALPHA_EVAL = {"task": "add3", "accuracy": {"1": 0.25, "2": 0.5, "4": 0.75, "8": 0.875}, "aurac_log2": 0.6}


@pytest.fixture
def tenants_path(tmp_path) -> Path:
    return write_tenants(tmp_path / "tenants.toml", ["alpha"])


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters for the tiny model: `dir` holds alpha (r_max 8, ranks 1,2,4,8, eval results) and beta
    (r_max 4, ranks 1,2,4); gamma (r_max 2) lies outside it, for admin loading."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    served = root / "served"
    paths = {
        "alpha": save_tiny_adapter(tiny_model_dir, served / "alpha", "alpha", 8, (1, 2, 4, 8), 1, ALPHA_EVAL),
        "beta": save_tiny_adapter(tiny_model_dir, served / "beta", "beta", 4, (1, 2, 4), 2),
        "gamma": save_tiny_adapter(tiny_model_dir, root / "gamma", "gamma", 2, (1, 2), 3),
    }
    paths["dir"] = served
    return paths


def native_settings(tiny_model_dir, tiny_adapters, tenants: Path | None, **overrides):
    from matryoshka_lora.server import ServerSettings

    values = dict(
        model=str(tiny_model_dir),
        adapters=[tiny_adapters["dir"]],
        tenants=tenants,
        max_num_seqs=4,
        max_queue_len=16,
        max_prompt_tokens=64,
        max_output_tokens=180,
        num_threads=1,
    )
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture(scope="session")
def native_server(tiny_model_dir, tiny_adapters, tmp_path_factory):
    """(url, app) of a server on the real NativeBackend, built from settings as `serve` does."""
    from matryoshka_lora.server import create_app

    tenants = write_tenants(tmp_path_factory.mktemp("tenants") / "tenants.toml", ["alpha"])
    app = create_app(native_settings(tiny_model_dir, tiny_adapters, tenants))
    with serving(app) as url:
        yield url, app
