"""This machine in Go's words (GOOS/GOARCH), plugin executable names, and ELF identification."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass
from enum import StrEnum

# Python reports the kernel's machine name; Grafana names binaries with Go's GOARCH.
_GOARCH_BY_MACHINE = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "x86": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

# ELF e_machine values (System V gABI) for each GOARCH we can check.
ELF_MACHINE_BY_GOARCH = {
    "amd64": 62,  # EM_X86_64
    "arm64": 183,  # EM_AARCH64
    "arm": 40,  # EM_ARM
    "386": 3,  # EM_386
    "ppc64le": 21,  # EM_PPC64
    "s390x": 22,  # EM_S390
    "riscv64": 243,  # EM_RISCV
}

_ELF_MACHINE_NAMES = {
    62: "x86-64",
    183: "aarch64",
    40: "arm",
    3: "i386",
    21: "ppc64",
    22: "s390",
    243: "riscv",
    8: "mips",
    2: "sparc",
}

# Go's GOOS values for the systems Python can tell apart.
_GOOS_BY_SYSTEM = {
    "linux": "linux",
    "darwin": "darwin",
    "windows": "windows",
    "freebsd": "freebsd",
    "openbsd": "openbsd",
    "netbsd": "netbsd",
}


def go_os(system: str | None = None) -> str:
    """GOOS for ``system`` (default: this machine), e.g. ``linux``."""
    name = (system if system is not None else _platform.system()).lower()
    return _GOOS_BY_SYSTEM.get(name, name)


def go_arch(machine: str | None = None) -> str:
    """GOARCH for ``machine`` (default: this machine), e.g. ``x86_64`` → ``amd64``.

    An unknown machine name is passed through lowercased: it may already be Go's spelling, and
    if not, the executable simply will not be found, which the caller reports precisely.
    """
    name = (machine if machine is not None else _platform.machine()).lower()
    return _GOARCH_BY_MACHINE.get(name, name)


@dataclass(frozen=True, slots=True)
class GoPlatform:
    """A GOOS/GOARCH pair; plugin binaries are named after it."""

    goos: str
    goarch: str

    @classmethod
    def current(cls) -> GoPlatform:
        return cls(goos=go_os(), goarch=go_arch())

    @property
    def elf_machine(self) -> int | None:
        """The ELF e_machine a native binary has here, or None if we do not know it."""
        return ELF_MACHINE_BY_GOARCH.get(self.goarch)

    @property
    def uses_elf(self) -> bool:
        """Whether native binaries on this OS are ELF files (not Mach-O or PE)."""
        return self.goos not in ("darwin", "windows")


def executable_name(executable: str, plugin_type: str, goos: str, goarch: str) -> str:
    """The file name Grafana starts for a backend plugin, relative to its plugin directory.

    Renderer and secrets-manager plugins ignore ``executable``: Grafana starts them under a
    fixed name.
    """
    if plugin_type == "renderer":
        prefix = "plugin_start"
    elif plugin_type == "secretsmanager":
        prefix = "secrets_plugin_start"
    else:
        prefix = executable
    suffix = ".exe" if goos == "windows" else ""
    return f"{prefix}_{goos}_{goarch.lower()}{suffix}"


class BinaryFormat(StrEnum):
    ELF = "elf"
    SCRIPT = "script"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class BinaryHeader:
    """What the first bytes of a file say it is."""

    format: BinaryFormat
    elf_machine: int | None = None
    elf_class: int | None = None  # 1 = 32-bit, 2 = 64-bit
    leading_bytes: bytes = b""

    def describe(self) -> str:
        if self.format is BinaryFormat.SCRIPT:
            return "a #! script"
        if self.format is BinaryFormat.ELF:
            bits = {1: "32-bit ", 2: "64-bit "}.get(self.elf_class or 0, "")
            return f"a {bits}ELF file for {elf_machine_name(self.elf_machine)}"
        return f"not an ELF file or #! script (starts with {self.leading_bytes!r})"


_ELF_MAGIC = b"\x7fELF"
_ELF_HEADER_PREFIX = 20  # e_ident (16) + e_type (2) + e_machine (2)


def elf_machine_name(machine: int | None) -> str:
    if machine is None:
        return "an unknown machine"
    name = _ELF_MACHINE_NAMES.get(machine)
    return f"{name} (e_machine {machine})" if name else f"e_machine {machine}"


def parse_binary_header(head: bytes) -> BinaryHeader:
    """Identify a file from its first 20 (or more) bytes."""
    if head.startswith(b"#!"):
        return BinaryHeader(format=BinaryFormat.SCRIPT)
    if head.startswith(_ELF_MAGIC) and len(head) >= _ELF_HEADER_PREFIX:
        # e_machine is stored in the file's own byte order, given by EI_DATA.
        machine = int.from_bytes(head[18:20], "big" if head[5] == 2 else "little")
        return BinaryHeader(format=BinaryFormat.ELF, elf_machine=machine, elf_class=head[4])
    return BinaryHeader(format=BinaryFormat.OTHER, leading_bytes=head[:8])
