#!/usr/bin/env bash
# Set everything up, then run the bridge on the bundled fixture plugins with the example config.
# Extra arguments go to `grafana-bridge serve` (e.g. `--listen :3200`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# git does not keep file modes beyond the executable bit; tokens are secrets.
chmod 600 examples/tokens.csv
export QUICKSTART_API_KEY=${QUICKSTART_API_KEY:-not-a-real-secret}
exec .venv/bin/grafana-bridge serve --config examples/quickstart.yaml "$@"
