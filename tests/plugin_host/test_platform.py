"""Go platform names, plugin executable names and ELF identification."""

from __future__ import annotations

import pytest

from plugin_host.platform import (
    BinaryFormat,
    GoPlatform,
    executable_name,
    go_arch,
    go_os,
    parse_binary_header,
)
from tests.plugin_host.signing import EM_AARCH64, EM_X86_64, elf_header

GOARCH = {
    "x86_64": "amd64",
    "AMD64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "mips64": "mips64",  # unknown names pass through, lowercased
}


@pytest.mark.parametrize(("machine", "expected"), GOARCH.items())
def test_go_arch(machine: str, expected: str) -> None:
    assert go_arch(machine) == expected


@pytest.mark.parametrize(
    ("system", "expected"), [("Linux", "linux"), ("Darwin", "darwin"), ("Windows", "windows")]
)
def test_go_os(system: str, expected: str) -> None:
    assert go_os(system) == expected


def test_current_platform_is_go_named() -> None:
    current = GoPlatform.current()
    assert current == GoPlatform(goos=go_os(), goarch=go_arch())
    assert current.goarch not in ("x86_64", "aarch64")


EXECUTABLES = {
    "datasource": (("gpx_acme", "datasource", "linux", "amd64"), "gpx_acme_linux_amd64"),
    "app on darwin": (("gpx_app", "app", "darwin", "arm64"), "gpx_app_darwin_arm64"),
    "windows adds .exe": (
        ("gpx_acme", "datasource", "windows", "amd64"),
        "gpx_acme_windows_amd64.exe",
    ),
    "arch lowercased": (("gpx_acme", "datasource", "linux", "ARM64"), "gpx_acme_linux_arm64"),
    "renderer": (("ignored", "renderer", "linux", "amd64"), "plugin_start_linux_amd64"),
    "secretsmanager": (
        ("ignored", "secretsmanager", "linux", "arm"),
        "secrets_plugin_start_linux_arm",
    ),
}


@pytest.mark.parametrize("row", EXECUTABLES.values(), ids=EXECUTABLES.keys())
def test_executable_name(row: tuple[tuple[str, str, str, str], str]) -> None:
    args, expected = row
    assert executable_name(*args) == expected


HEADERS = {
    "x86-64": (elf_header(EM_X86_64), BinaryFormat.ELF, EM_X86_64),
    "aarch64": (elf_header(EM_AARCH64), BinaryFormat.ELF, EM_AARCH64),
    "big-endian": (elf_header(22, little_endian=False), BinaryFormat.ELF, 22),
    "script": (b"#!/usr/bin/env python3\n", BinaryFormat.SCRIPT, None),
    "truncated ELF": (b"\x7fELF\x02\x01", BinaryFormat.OTHER, None),
    "PE": (b"MZ\x90\x00" + bytes(60), BinaryFormat.OTHER, None),
}


@pytest.mark.parametrize("row", HEADERS.values(), ids=HEADERS.keys())
def test_parse_binary_header(row: tuple[bytes, BinaryFormat, int | None]) -> None:
    head, fmt, machine = row
    header = parse_binary_header(head)
    assert (header.format, header.elf_machine) == (fmt, machine)


def test_elf_machine_for_each_goarch() -> None:
    assert GoPlatform("linux", "amd64").elf_machine == 62
    assert GoPlatform("linux", "arm64").elf_machine == 183
    assert GoPlatform("linux", "arm").elf_machine == 40
    assert GoPlatform("linux", "386").elf_machine == 3
    assert GoPlatform("darwin", "arm64").uses_elf is False
