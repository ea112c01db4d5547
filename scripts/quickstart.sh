#!/usr/bin/env bash
# Set everything up, then run the bridge on the bundled fixture plugins with the example config.
# Extra arguments go to `grafana-bridge serve` (e.g. `--listen :3200`).
#
# Once, it makes a local CA and a server certificate for 127.0.0.1/localhost in data/tls/
# (kept on later runs, so what trusts data/tls/ca.crt keeps working), and on every run writes
# data/kubeconfig for kubectl with the admin token from examples/tokens.csv.
# QUICKSTART_SETUP=0 skips scripts/setup.sh (for an already set-up checkout).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ${QUICKSTART_SETUP:-1} != 0 ]]; then
  bash scripts/setup.sh
fi
# git does not keep file modes beyond the executable bit; tokens are secrets.
chmod 600 examples/tokens.csv
export QUICKSTART_API_KEY=${QUICKSTART_API_KEY:-not-a-real-secret}
.venv/bin/grafana-bridge certs --dir data/tls
admin_token=$(awk -F, '$2 == "admin" { print $1; exit }' examples/tokens.csv)
.venv/bin/grafana-bridge kubeconfig --config examples/quickstart.yaml --token "$admin_token" \
  --certificate-authority data/tls/ca.crt --output data/kubeconfig
exec .venv/bin/grafana-bridge serve --config examples/quickstart.yaml "$@"
