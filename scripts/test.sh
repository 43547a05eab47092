#!/usr/bin/env bash
# Install everything the test suite needs (venv + dev tools + system tools), then run it.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
# System tools the deploy tests drive for real (Prometheus/promtool, ...), when the script exists.
[ -f .ci/deploy_deps.sh ] && bash .ci/deploy_deps.sh
exec .venv/bin/python -m pytest "$@"
