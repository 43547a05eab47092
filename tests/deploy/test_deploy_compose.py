"""deploy/compose.yaml, checked by docker-compose itself (`config`: interpolation, merge keys, its
schema) and by the compose_spec parser (the Compose Specification, strict), for both profiles; plus
the wiring between the services and the files they mount.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from deploy_support import DEPLOY, find_tool, missing, run_tool

COMPOSE = DEPLOY / "compose.yaml"
PROFILES = ("gpu", "cpu")


def _env() -> dict:
    """The defaults in compose.yaml must be enough: no MATRYOSHKA_* / GRAFANA_* from the caller's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MATRYOSHKA_", "GRAFANA_"))}


def _spec():
    try:
        from compose_spec import PyCompose
    except ImportError:
        missing("compose-spec (PyPI) is not installed")
    return PyCompose


@pytest.fixture(scope="module", params=PROFILES)
def rendered(request) -> tuple[str, str]:
    """(profile, `docker-compose config` output) for each profile."""
    result = run_tool(
        [find_tool("docker-compose"), "-f", str(COMPOSE), "--profile", request.param, "config"], env=_env()
    )
    assert result.returncode == 0, result.stderr
    return request.param, result.stdout


def test_compose_spec_accepts_the_rendered_file(rendered):
    _, text = rendered
    assert set(_spec().from_yaml(text).service_names()) == {"server-gpu", "server-cpu", "prometheus", "grafana"}


@pytest.mark.parametrize(
    "old, new",
    [
        ("stop_grace_period: 45s", "stop_grace_period: soon"),
        ("capabilities: [gpu]", "capabilities: gpu"),
        ("    shm_size: 8gb", "    shm_size: 8gb\n    gpus_please: all"),
        ('"127.0.0.1:9090:9090"', '"127.0.0.1:9090:nine"'),
    ],
    ids=["duration", "capabilities", "unknown-key", "port"],
)
def test_a_broken_compose_file_is_rejected(tool, tmp_path, old, new):
    text = COMPOSE.read_text()
    assert text.count(old) == 1, old
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new))
    result = run_tool([tool("docker-compose"), "-f", str(broken), "--profile", "gpu", "config"], env=_env())
    if result.returncode == 0:  # docker-compose 1.x is lenient on some fields; the spec parser is not
        with pytest.raises(ValueError):
            _spec().from_yaml(result.stdout)


def _services(text: str) -> dict:
    return yaml.safe_load(text)["services"]


def _binds(service: dict) -> dict[str, str]:
    """container path -> host path of each bind mount."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":") if isinstance(volume, str) else (volume["source"], volume["target"])
        if source.startswith("/"):
            out[target] = source
    return out


def _server(profile: str, services: dict) -> dict:
    return services[f"server-{profile}"]


def test_mounted_files_exist(rendered):
    profile, text = rendered
    services = _services(text)
    for name in ("prometheus", "grafana", f"server-{profile}"):
        for target, source in _binds(services[name]).items():
            if target == "/models":  # the operator's model directory
                continue
            assert Path(source).exists(), f"{name} mounts {source} (missing) at {target}"


def test_prometheus_scrapes_the_server_with_its_rules(rendered):
    profile, text = rendered
    services = _services(text)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    binds = _binds(services["prometheus"])
    assert binds["/etc/prometheus/prometheus.yml"].endswith("deploy/prometheus/prometheus.yml")
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in binds, f"rule file {rule_file} is not mounted beside the config"
    (target,) = config["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    server = _server(profile, services)
    assert host in server["networks"]["default"]["aliases"]
    assert any(
        str(p["target"] if isinstance(p, dict) else p.split(":")[-1].split("/")[0]) == port for p in server["ports"]
    )


def test_grafana_loads_the_provisioning_and_dashboards(rendered):
    _, text = rendered
    binds = _binds(_services(text)["grafana"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "matryoshka.yml").read_text())
    assert binds[provider["providers"][0]["options"]["path"]].endswith("deploy/grafana/dashboards")
    assert binds["/etc/grafana/provisioning/datasources"].endswith("deploy/grafana/provisioning/datasources")
    assert binds["/etc/grafana/provisioning/dashboards"].endswith("deploy/grafana/provisioning/dashboards")


def test_server_profiles(rendered):
    profile, text = rendered
    server = _server(profile, _services(text))
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    ports = [
        p if isinstance(p, str) else f"{p.get('host_ip', '0.0.0.0')}:{p['published']}:{p['target']}"
        for p in server["ports"]
    ]
    env = server["environment"]
    if profile == "gpu":
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert env["MATRYOSHKA_BACKEND"] == "vllm" and "MATRYOSHKA_TENANTS" in env
    else:
        assert devices == [] and env["MATRYOSHKA_BACKEND"] == "native"
        assert all(port.startswith("127.0.0.1:") for port in ports), "an open (keyless) server must stay on loopback"
    grace = int(re.fullmatch(r"(\d+)s", server["stop_grace_period"]).group(1))
    assert grace > float(env["MATRYOSHKA_DRAIN_TIMEOUT_S"]), "SIGKILL would cut the drain short"
