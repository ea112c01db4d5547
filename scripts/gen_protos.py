"""Regenerate the Python modules for protos/ from the .proto files (or check they are current).

Usage:
    .venv/bin/python scripts/gen_protos.py           # write generated files in place
    .venv/bin/python scripts/gen_protos.py --check   # exit 1 if committed files drift

protoc runs with the repository root as include path, so generated imports are absolute
(``from protos.pluginv2 import backend_pb2``) and the descriptors are named
``protos/pluginv2/backend.proto`` etc.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

REPO_ROOT = Path(__file__).resolve().parent.parent

# Relative to REPO_ROOT, in the order protoc receives them.
PROTO_FILES: tuple[str, ...] = (
    "protos/pluginv2/backend.proto",
    "protos/plugin/grpc_broker.proto",
    "protos/plugin/grpc_controller.proto",
    "protos/plugin/grpc_stdio.proto",
)

GENERATED_SUFFIXES: tuple[str, ...] = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generated_files() -> list[str]:
    """Every generated file, relative to the output root."""
    names: list[str] = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names.extend(stem + suffix for suffix in GENERATED_SUFFIXES)
    return names


def _find_plugin(name: str) -> str:
    # Prefer the plugin installed next to the running interpreter (the venv), so the
    # same mypy-protobuf version is used whatever PATH says.
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"gen_protos: {name} not found; install mypy-protobuf")
    return found


def _bundled_proto_dir() -> str:
    return str(Path(grpc_tools.__file__).resolve().parent / "_proto")


def generate(out_dir: Path) -> None:
    """Run protoc once for all PROTO_FILES, writing into out_dir."""
    out = str(out_dir)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--proto_path={_bundled_proto_dir()}",
        f"--plugin=protoc-gen-mypy={_find_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_find_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *PROTO_FILES,
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"gen_protos: protoc failed with exit status {result.returncode}")


def drifted(generated_root: Path) -> list[str]:
    """Generated files whose committed copy is missing or differs byte-for-byte."""
    differ: list[str] = []
    for rel in generated_files():
        fresh = generated_root / rel
        committed = REPO_ROOT / rel
        if not committed.is_file() or not filecmp.cmp(fresh, committed, shallow=False):
            differ.append(rel)
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and compare with the committed files",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gen_protos-") as tmp:
        tmp_root = Path(tmp)
        generate(tmp_root)
        changed = drifted(tmp_root)
        if args.check:
            for rel in changed:
                print(f"out of date: {rel}")
            if changed:
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            return 0
        for rel in generated_files():
            target = REPO_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_root / rel, target)
        for rel in changed:
            print(f"updated: {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
