"""deploy/k8s: core manifests through `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas it
ships), the PodMonitor through the Prometheus Operator's CRD models (cloudcoil), and the wiring between
the objects (selectors, ports, probes, drain).

InferencePool and HTTPRoute have no schema package on PyPI: docs/deploy.md says how they were checked.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from deploy_support import DEPLOY, missing, run_tool

K8S = DEPLOY / "k8s"
CORE = ("deployment.yaml", "service.yaml", "pvc.yaml", "pdb.yaml")
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest with the preStop sleep action on by default; newest shipped


def docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def by_kind() -> dict[str, dict]:
    manifests = [path.name for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"]
    return {doc["kind"]: doc for name in manifests for doc in docs(name)}


def validate(tool, paths, version: str):
    return run_tool([tool("kubernetes-validate"), "--strict", "-k", version, *map(str, paths)])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_manifests_validate_strictly(tool, version):
    result = validate(tool, [K8S / name for name in CORE], version)
    assert result.returncode == 0, result.stdout + result.stderr
    num_objects = sum(len(docs(name)) for name in CORE)
    assert result.stdout.count(" passed for resource ") + result.stderr.count(" passed for resource ") == num_objects


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("          image: registry", "          imag: registry", "'imag' was unexpected"),
        ("  replicas: 2", "  replicas: two", "'two' is not of type 'integer'"),
        (
            "            periodSeconds: 10\n            failureThreshold: 90",
            "            periodSeconds: ten\n            failureThreshold: 90",
            "'ten' is not of type 'integer'",
        ),
        (
            "      terminationGracePeriodSeconds: 75",
            "      terminationGracePeriod: 75",
            "'terminationGracePeriod' was unexpected",
        ),
    ],
    ids=["unknown-field", "replicas-type", "probe-type", "misspelt-grace"],
)
def test_a_broken_manifest_fails(tool, tmp_path, old, new, expected):
    text = (K8S / "deployment.yaml").read_text()
    assert text.count(old) == 1, old
    broken = tmp_path / "deployment.yaml"
    broken.write_text(text.replace(old, new))
    result = validate(tool, [broken], KUBERNETES_VERSIONS[-1])
    assert result.returncode != 0 and expected in result.stdout + result.stderr, result.stdout + result.stderr


def podmonitor_errors(doc: dict) -> list[str]:
    """Prometheus Operator CRD check: pydantic validation, plus keys its models do not know (dropped)."""
    try:
        from cloudcoil.models.prometheus_operator.v1 import PodMonitor
    except ImportError:
        missing("cloudcoil-models-prometheus-operator is not installed")
    from pydantic import ValidationError

    try:
        model = PodMonitor.model_validate(doc)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [] if dumped == doc else [f"unknown fields: the models keep {dumped}"]


def test_podmonitor_matches_the_prometheus_operator_crd():
    (doc,) = docs("podmonitor.yaml")
    assert podmonitor_errors(doc) == []


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "podMetricsEndpoints", 0, "portt"), "http"),
        (("spec", "podMetricsEndpoints", 0, "interval"), "15 seconds"),
        (("spec", "podMetricsEndpoints", 0, "relabelings", 0, "action"), "replaceall"),
        (("spec", "selector"), "app"),
    ],
    ids=["unknown-field", "duration", "enum", "type"],
)
def test_a_broken_podmonitor_fails(path, value):
    (doc,) = docs("podmonitor.yaml")
    broken = copy.deepcopy(doc)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert podmonitor_errors(broken) != []


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_runs_on_gpu_nodes():
    deployment = by_kind()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert _container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    "probe, path", [("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")]
)
def test_probes(probe, path):
    container = _container(by_kind()["Deployment"])
    port_names = {port["name"] for port in container["ports"]}
    assert container[probe]["httpGet"]["path"] == path and container[probe]["httpGet"]["port"] in port_names


def test_grace_period_outlasts_the_drain():
    deployment = by_kind()["Deployment"]
    container = _container(deployment)
    env = {e["name"]: e["value"] for e in container["env"]}
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + float(env["MATRYOSHKA_DRAIN_TIMEOUT_S"])


def test_adapters_and_model_come_from_volumes():
    deployment = by_kind()["Deployment"]
    container = _container(deployment)
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for setting in ("MATRYOSHKA_ADAPTERS", "MATRYOSHKA_MODEL", "MATRYOSHKA_TENANTS"):
        mount = next(m for path, m in mounts.items() if env[setting].startswith(path))
        assert mount["readOnly"] is True and mount["name"] in volumes, setting
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    assert claims == {doc["metadata"]["name"] for doc in docs("pvc.yaml")}


@pytest.mark.parametrize("kind", ["Service", "PodDisruptionBudget", "PodMonitor", "InferencePool"])
def test_selectors_pick_the_server_pods(kind):
    objects = by_kind()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    spec = objects[kind]["spec"]
    selector = spec["selector"].get("matchLabels", spec["selector"])
    assert selector and selector.items() <= pod_labels.items()


def test_ports_agree():
    objects = by_kind()
    (port,) = _container(objects["Deployment"])["ports"]
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert objects["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == port["name"]
    assert objects["InferencePool"]["spec"]["targetPorts"] == [{"number": port["containerPort"]}]
    (rule,) = objects["HTTPRoute"]["spec"]["rules"]
    assert rule["backendRefs"][0]["name"] == objects["InferencePool"]["metadata"]["name"]
