#!/usr/bin/env bash
# The whole test suite: set up, lint and type-check, then every test against real processes.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k handshake`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

echo "==> ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy (strict)" >&2
.venv/bin/mypy
echo "==> pytest" >&2
exec .venv/bin/pytest -n "${PYTEST_WORKERS:-2}" "$@"
