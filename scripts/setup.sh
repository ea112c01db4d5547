#!/usr/bin/env bash
# Set up everything the bridge and its tests need, from a fresh clone, with nothing installed
# by hand: a virtualenv with the project and its tools, the Go toolchain from Debian packages,
# and the Go fixture plugin built with the real hashicorp/go-plugin. Idempotent and quiet when
# there is nothing to do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

say() { printf '==> %s\n' "$*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: Python 3.11 or newer is needed (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the dependency list changed since the last successful install.
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    say "installing the project and its development tools into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

if [[ "${BRIDGE_SKIP_GO:-}" != "1" ]]; then
    bash scripts/install-go-toolchain.sh
    "$VENV/bin/python" scripts/build_go_fixture.py >/dev/null
fi
