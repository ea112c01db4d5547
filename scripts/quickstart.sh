#!/usr/bin/env bash
# Set everything up, then run the bridge on the bundled fixture plugins with the example config.
# Extra arguments go to `grafana-bridge serve` (e.g. `--listen :3200`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/grafana-bridge serve --config examples/quickstart.yaml "$@"
