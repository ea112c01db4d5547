#!/usr/bin/env python3
"""Build the Go fixture plugin (fixtures/plugins/go-datasource) with the real hashicorp/go-plugin.

The build is offline and uses Debian's packages only (see scripts/install-go-toolchain.sh):
GOPATH mode (GO111MODULE=off) with a private GOPATH under build/gofixture/ in front of
/usr/share/gocode, Go code for pluginv2 generated from protos/pluginv2/backend.proto by
Debian's protoc-gen-go (v1.3) and protoc-gen-go-grpc.

On success the binary's path is the only thing printed on stdout. Exit status:
0 built or already up to date, 1 protoc/compiler failure (its output goes to stderr),
3 toolchain missing and --no-install given, 4 toolchain installation failed.
Runnable from any working directory; stdlib only.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos" / "pluginv2"
PROTO_FILE = PROTO_DIR / "backend.proto"
FIXTURE_DIR = REPO_ROOT / "fixtures" / "plugins" / "go-datasource"
FIXTURE_SRC = FIXTURE_DIR / "src"
EXECUTABLE = "gpx_gofixture"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-go-toolchain.sh"

BUILD_DIR = REPO_ROOT / "build" / "gofixture"
GOPATH_DIR = BUILD_DIR / "gopath"
GOCACHE_DIR = BUILD_DIR / "cache"
LOCK_FILE = BUILD_DIR / ".lock"

# Import paths inside the private GOPATH (".invalid" can never be fetched).
IMPORT_ROOT = "bridge.invalid/gofixture"
PLUGINV2_PKG = f"{IMPORT_ROOT}/pluginv2"
MAIN_PKG = f"{IMPORT_ROOT}/cmd/{EXECUTABLE}"

DEBIAN_GOCODE = Path("/usr/share/gocode")
REQUIRED_TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
REQUIRED_GO_SOURCES = (
    "github.com/hashicorp/go-plugin",
    "github.com/hashicorp/go-hclog",
    "google.golang.org/grpc",
    "github.com/golang/protobuf/proto",
)
GO_PLUGIN_DEB = "golang-github-hashicorp-go-plugin-dev"

EXIT_BUILD_FAILED = 1
EXIT_TOOLCHAIN_MISSING = 3
EXIT_INSTALL_FAILED = 4

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class BuildError(Exception):
    """A build step failed; ``output`` holds what the failing tool printed."""

    def __init__(self, message: str, output: str = "", exit_code: int = EXIT_BUILD_FAILED):
        super().__init__(message)
        self.output = output
        self.exit_code = exit_code


@dataclass(frozen=True)
class Toolchain:
    go: str
    protoc: str
    protoc_gen_go: str
    protoc_gen_go_grpc: str


def binary_path() -> Path:
    """Where the built plugin executable goes (Grafana's ``<executable>_<os>_<arch>``)."""
    machine = platform.machine().lower()
    arch = _GOARCH.get(machine, machine)
    return FIXTURE_DIR / f"{EXECUTABLE}_linux_{arch}"


def _search_path() -> str:
    # Debian's golang-go keeps the real go binary in /usr/lib/go/bin.
    return os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/lib/go/bin"])


def _which(tool: str) -> str | None:
    # Prefer Debian's generators over any newer ones in PATH: the v1.3 protoc-gen-go
    # output is what builds against Debian's grpc 1.33 (see toolchain.md).
    debian = Path("/usr/bin") / tool
    if tool.startswith("protoc-gen-") and debian.is_file() and os.access(debian, os.X_OK):
        return str(debian)
    return shutil.which(tool, path=_search_path())


def find_toolchain() -> tuple[Toolchain | None, list[str]]:
    """Return the toolchain, or None and the list of what is missing."""
    found = {tool: _which(tool) for tool in REQUIRED_TOOLS}
    missing = [tool for tool, where in found.items() if where is None]
    missing += [
        str(DEBIAN_GOCODE / "src" / src)
        for src in REQUIRED_GO_SOURCES
        if not (DEBIAN_GOCODE / "src" / src).is_dir()
    ]
    if missing:
        return None, missing
    paths = {tool: where for tool, where in found.items() if where is not None}
    return (
        Toolchain(
            go=paths["go"],
            protoc=paths["protoc"],
            protoc_gen_go=paths["protoc-gen-go"],
            protoc_gen_go_grpc=paths["protoc-gen-go-grpc"],
        ),
        [],
    )


def ensure_toolchain(*, allow_install: bool) -> Toolchain:
    toolchain, missing = find_toolchain()
    if toolchain is not None:
        return toolchain
    if not allow_install:
        raise BuildError(
            "Go toolchain missing (" + ", ".join(missing) + "); "
            f"run {INSTALL_SCRIPT.relative_to(REPO_ROOT)} or drop --no-install",
            exit_code=EXIT_TOOLCHAIN_MISSING,
        )
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    toolchain, missing = find_toolchain()
    if proc.returncode != 0 or toolchain is None:
        raise BuildError(
            f"installing the Go toolchain failed (exit {proc.returncode}); "
            "still missing: " + (", ".join(missing) or "nothing"),
            output=proc.stdout + proc.stderr,
            exit_code=EXIT_INSTALL_FAILED,
        )
    return toolchain


def input_files() -> list[Path]:
    """Everything the binary is built from (a change to any of them forces a rebuild)."""
    go_sources = sorted(FIXTURE_SRC.glob("*.go"))
    if not go_sources:
        raise BuildError(f"no Go sources in {FIXTURE_SRC}")
    if not PROTO_FILE.is_file():
        raise BuildError(f"missing {PROTO_FILE}")
    return [PROTO_FILE, Path(__file__).resolve(), *go_sources]


def is_up_to_date(binary: Path, inputs: Sequence[Path]) -> bool:
    try:
        built = binary.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime_ns < built for src in inputs)


def _run(argv: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        list(argv),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(
            f"{Path(argv[0]).name} failed (exit {proc.returncode}): {' '.join(argv)}",
            output=proc.stdout,
        )


def go_plugin_version() -> str:
    """Upstream version of Debian's go-plugin package (e.g. ``1.0.1``), or ``unknown``."""
    dpkg_query = shutil.which("dpkg-query")
    if dpkg_query is None:
        return "unknown"
    proc = subprocess.run(
        [dpkg_query, "-W", "-f=${Version}", GO_PLUGIN_DEB],
        capture_output=True,
        text=True,
        check=False,
    )
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version:
        return "unknown"
    version = version.split(":", 1)[-1]  # epoch
    return version.rsplit("-", 1)[0] if "-" in version else version  # Debian revision


def go_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        {
            "PATH": _search_path(),
            "GO111MODULE": "off",
            "GOPATH": os.pathsep.join([str(GOPATH_DIR), str(DEBIAN_GOCODE)]),
            "GOPROXY": "off",
            "GOFLAGS": "",
            "GOENV": "off",
            "GOCACHE": str(GOCACHE_DIR),
            "CGO_ENABLED": "0",
        }
    )
    env.setdefault("HOME", str(BUILD_DIR))
    return env


def _replace_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build(toolchain: Toolchain, binary: Path) -> None:
    gen_dir = _replace_dir(GOPATH_DIR / "src" / PLUGINV2_PKG)
    main_dir = _replace_dir(GOPATH_DIR / "src" / MAIN_PKG)

    _run(
        [
            toolchain.protoc,
            f"--plugin=protoc-gen-go={toolchain.protoc_gen_go}",
            f"--plugin=protoc-gen-go-grpc={toolchain.protoc_gen_go_grpc}",
            f"-I{PROTO_DIR}",
            f"--go_out={gen_dir}",
            f"--go-grpc_out={gen_dir}",
            PROTO_FILE.name,
        ],
        cwd=PROTO_DIR,
    )
    for src in FIXTURE_SRC.glob("*.go"):
        shutil.copy2(src, main_dir / src.name)

    tmp_binary = binary.with_name(f"{binary.name}.tmp-{os.getpid()}")
    try:
        _run(
            [
                toolchain.go,
                "build",
                "-o",
                str(tmp_binary),
                "-ldflags",
                f"-X main.goPluginVersion={go_plugin_version()}",
                ".",
            ],
            cwd=main_dir,
            env=go_env(),
        )
        os.replace(tmp_binary, binary)
    finally:
        tmp_binary.unlink(missing_ok=True)


@contextmanager
def build_lock() -> Iterator[None]:
    """Serialise concurrent builds (e.g. pytest-xdist workers)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="fail (exit 3) instead of installing a missing toolchain",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="report steps on stderr")
    args = parser.parse_args(argv)

    binary = binary_path()
    started = time.monotonic()
    try:
        inputs = input_files()
        with build_lock():
            if not args.force and is_up_to_date(binary, inputs):
                if args.verbose:
                    print(f"up to date: {binary}", file=sys.stderr)
            else:
                toolchain = ensure_toolchain(allow_install=not args.no_install)
                build(toolchain, binary)
                if args.verbose:
                    elapsed = time.monotonic() - started
                    print(f"built {binary} in {elapsed:.1f}s", file=sys.stderr)
    except BuildError as exc:
        print(f"build_go_fixture: error: {exc}", file=sys.stderr)
        if exc.output:
            print(exc.output.rstrip(), file=sys.stderr)
        return exc.exit_code
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
