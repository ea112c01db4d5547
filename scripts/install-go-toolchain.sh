#!/usr/bin/env bash
# Install the Go toolchain used to build the Go fixture plugin
# (fixtures/plugins/go-datasource) from Debian packages only.
#
# Idempotent: when go, protoc, protoc-gen-go, protoc-gen-go-grpc and the
# hashicorp/go-plugin sources are already present it does nothing and prints
# nothing. Otherwise it installs the Debian packages listed below (running
# `apt-get update` only when the package lists are missing or a first install
# attempt fails). Versions: go 1.19, go-plugin 1.0.1, grpc-go 1.33, protoc 3.21.
set -euo pipefail

PACKAGES=(
    golang-go
    golang-github-hashicorp-go-plugin-dev
    golang-google-grpc-dev
    golang-google-protobuf-dev
    golang-goprotobuf-dev
    protoc-gen-go-grpc
    protobuf-compiler
)

GOCODE=/usr/share/gocode/src
REQUIRED_SOURCES=(
    "$GOCODE/github.com/hashicorp/go-plugin"
    "$GOCODE/github.com/hashicorp/go-hclog"
    "$GOCODE/google.golang.org/grpc"
    "$GOCODE/github.com/golang/protobuf/proto"
)

# Debian's golang-go puts `go` in /usr/lib/go/bin with a symlink in /usr/bin.
export PATH="$PATH:/usr/lib/go/bin"

die() {
    echo "install-go-toolchain: error: $*" >&2
    exit 1
}

missing() {
    local tool src
    for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
        command -v "$tool" >/dev/null 2>&1 || { echo "$tool"; return 0; }
    done
    for src in "${REQUIRED_SOURCES[@]}"; do
        [[ -d "$src" ]] || { echo "$src"; return 0; }
    done
    return 1
}

if ! what="$(missing)"; then
    exit 0 # everything present: stay quiet
fi

command -v apt-get >/dev/null 2>&1 || die "missing '$what' and apt-get is not available; install: ${PACKAGES[*]}"
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        die "missing '$what'; need root (or sudo) to install: ${PACKAGES[*]}"
    fi
else
    SUDO=()
fi

log="$(mktemp -t install-go-toolchain.XXXXXX)"
trap 'rm -f "$log"' EXIT

apt_update() {
    if ! "${SUDO[@]}" apt-get update -q >>"$log" 2>&1; then
        cat "$log" >&2
        die "apt-get update failed"
    fi
}

apt_install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1
}

# Package lists absent (fresh container): update first.
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    apt_update
fi

if ! apt_install; then
    # Stale lists are the usual cause (404 on a superseded .deb): refresh once.
    apt_update
    if ! apt_install; then
        cat "$log" >&2
        die "apt-get install failed for: ${PACKAGES[*]}"
    fi
fi

if what="$(missing)"; then
    cat "$log" >&2
    die "packages installed but '$what' is still missing"
fi
