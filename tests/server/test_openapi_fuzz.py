"""schemathesis fuzzes the OpenAPI of a real server on the tiny model, open and with a tenants file: no
5xx, and every request the schema calls invalid is refused (4xx), under the issue's checks and phases."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import native_settings
from .helpers import KEYS, serving, write_tenants

_BESIDE = Path(sys.executable).with_name("schemathesis")  # the venv's, also when its bin/ is not on PATH
SCHEMATHESIS = str(_BESIDE) if _BESIDE.is_file() else shutil.which("schemathesis")
CHECKS = "not_a_server_error,negative_data_rejection"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed (the dev extra installs it)")
@pytest.mark.parametrize("with_tenants", [False, True], ids=["open", "tenants"])
def test_fuzzed_openapi_finds_no_failure(tiny_model_dir, tiny_adapters, tmp_path, with_tenants):
    from matryoshka_lora.server import create_app

    tenants = write_tenants(tmp_path / "tenants.toml", ["alpha"]) if with_tenants else None
    settings = native_settings(tiny_model_dir, tiny_adapters, tenants, max_output_tokens=16)
    headers = ["-H", f"Authorization: Bearer {KEYS['root']}"] if with_tenants else []
    with serving(create_app(settings)) as url:
        result = subprocess.run(
            [
                SCHEMATHESIS,
                "run",
                f"{url}/openapi.json",
                "--checks",
                CHECKS,
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "25",
                "--request-timeout",
                "20",
                "--seed",
                "1",
                "--no-color",
                *headers,
            ],
            capture_output=True,
            cwd=tmp_path,  # its cache (.schemathesis/) lands there, not in the checkout
            text=True,
            timeout=540,
            check=False,
        )
    assert result.returncode == 0, result.stdout[-6000:]
