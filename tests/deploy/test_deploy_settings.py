"""Every MATRYOSHKA_* variable that a deploy artefact sets is a setting the server reads.

A misspelt variable is silently ignored by the server, so the artefacts are checked against the
`matryoshka-lora serve` settings themselves (ServerSettings, env prefix MATRYOSHKA_) and models.py's cache.
"""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_support import DEPLOY, REPO


def _dockerfile() -> set[str]:
    return set(re.findall(r"\b(MATRYOSHKA_[A-Z_]+)=", (REPO / "Dockerfile").read_text()))


def _compose() -> set[str]:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    return {name for service in services.values() for name in service.get("environment", {})}


def _k8s() -> set[str]:
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    return {
        env["name"] for container in deployment["spec"]["template"]["spec"]["containers"] for env in container["env"]
    }


@pytest.mark.parametrize("names", [_dockerfile, _compose, _k8s], ids=["Dockerfile", "compose", "k8s"])
def test_env_names_are_server_settings(names):
    try:
        from matryoshka_lora.server.settings import ServerSettings
    except ImportError as exc:
        pytest.skip(f"matryoshka_lora.server.settings is not importable yet ({exc})")
    known = {f"MATRYOSHKA_{name.upper()}" for name in ServerSettings.model_fields} | {"MATRYOSHKA_CACHE"}
    used = {name for name in names() if name.startswith("MATRYOSHKA_")}
    assert used and used <= known, f"unknown: {used - known}"
