"""Plugin discovery: find plugins on disk the way Grafana does and decide which may load."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from plugin_host.keyring import KeyRing
from plugin_host.platform import (
    BinaryFormat,
    GoPlatform,
    elf_machine_name,
    executable_name,
    parse_binary_header,
)
from plugin_host.plugin_json import PluginJSON, PluginJSONError, parse_plugin_json
from plugin_host.signature import (
    PluginSignature,
    SignatureStatus,
    compute_signature,
    inherit_signature,
    loading_decision,
    manifest_digest,
    sha256_file,
)

log = logging.getLogger(__name__)

PLUGIN_JSON = "plugin.json"
_SKIPPED_DIRS = frozenset({"node_modules"})
_HEADER_BYTES = 64


class LoadErrorCode(StrEnum):
    """Why a plugin was not loaded. Signature codes use Grafana's own error code names."""

    PLUGINS_DIR_MISSING = "pluginsDirMissing"
    DIRECTORY_UNREADABLE = "directoryUnreadable"
    INVALID_PLUGIN_JSON = "invalidPluginJson"
    DUPLICATE_PLUGIN = "duplicatePlugin"
    SIGNATURE_MISSING = "signatureMissing"
    SIGNATURE_INVALID = "signatureInvalid"
    SIGNATURE_MODIFIED = "signatureModified"
    PARENT_NOT_LOADED = "parentNotLoaded"
    EXECUTABLE_MISSING = "executableMissing"
    EXECUTABLE_NOT_REGULAR_FILE = "executableNotRegularFile"
    EXECUTABLE_NOT_EXECUTABLE = "executableNotExecutable"
    EXECUTABLE_WRONG_FORMAT = "executableWrongFormat"
    EXECUTABLE_WRONG_ARCHITECTURE = "executableWrongArchitecture"
    UNSAFE_PERMISSIONS = "unsafePermissions"


_SIGNATURE_CODES = {
    SignatureStatus.UNSIGNED: LoadErrorCode.SIGNATURE_MISSING,
    SignatureStatus.INVALID: LoadErrorCode.SIGNATURE_INVALID,
    SignatureStatus.MODIFIED: LoadErrorCode.SIGNATURE_MODIFIED,
}


@dataclass(frozen=True, slots=True)
class LoadError:
    """A plugin (or directory) that was not loaded, and a reason a person can act on."""

    plugin_id: str | None
    path: Path
    reason: str
    code: LoadErrorCode

    def __str__(self) -> str:
        who = f"plugin {self.plugin_id}" if self.plugin_id else str(self.path)
        return f"{who}: {self.reason}"


class PluginClass(StrEnum):
    """Where a plugin comes from; everything this host discovers on disk is external."""

    CORE = "core"
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginSpec:
    """A plugin that may be loaded: what it is, where it lives, and what to run for it."""

    plugin_json: PluginJSON
    directory: Path
    executable: Path | None  # None for plugins without a backend
    signature: PluginSignature
    parent_id: str | None = None
    children: tuple[str, ...] = ()
    class_: PluginClass = PluginClass.EXTERNAL
    # What the executable must hash to at every (re)start: the manifest's SHA-256 for a signed
    # plugin, the one taken at discovery otherwise; None (unsigned in dev mode): not checked.
    executable_sha256: str | None = None

    @property
    def id(self) -> str:
        return self.plugin_json.id

    @property
    def type(self) -> str:
        return self.plugin_json.type

    @property
    def version(self) -> str | None:
        return self.plugin_json.version


@dataclass(frozen=True, slots=True)
class DiscoveryResult:
    """The plugins that may load, the ones that may not (and why), and permitted risks."""

    plugins: tuple[PluginSpec, ...]
    errors: tuple[LoadError, ...]
    warnings: tuple[str, ...] = ()

    def get(self, plugin_id: str) -> PluginSpec | None:
        return next((p for p in self.plugins if p.id == plugin_id), None)


def discover(
    plugin_dirs: Iterable[Path | str],
    *,
    keyring: KeyRing | None = None,
    allow_unsigned: frozenset[str] = frozenset(),
    dev_mode: bool = False,
    grafana_root_url: str | None = None,
    platform: GoPlatform | None = None,
    strict_permissions: bool = True,
) -> DiscoveryResult:
    """Scan plugin directories; every top-level subdirectory of each is one plugin source.

    Blocking: it walks directories and hashes every plugin file. On the event loop use
    :func:`discover_async`.
    """
    run = _Discovery(
        keyring=keyring if keyring is not None else KeyRing.load(),
        allow_unsigned=allow_unsigned,
        dev_mode=dev_mode,
        grafana_root_url=grafana_root_url,
        platform=platform or GoPlatform.current(),
        strict_permissions=strict_permissions,
    )
    for plugins_dir in plugin_dirs:
        run.scan_plugins_dir(Path(os.path.abspath(plugins_dir)))
    return DiscoveryResult(
        plugins=tuple(run.specs), errors=tuple(run.errors), warnings=tuple(run.warnings)
    )


async def discover_async(
    plugin_dirs: Iterable[Path | str],
    *,
    keyring: KeyRing | None = None,
    allow_unsigned: frozenset[str] = frozenset(),
    dev_mode: bool = False,
    grafana_root_url: str | None = None,
    platform: GoPlatform | None = None,
    strict_permissions: bool = True,
) -> DiscoveryResult:
    """:func:`discover` in a worker thread, so the event loop keeps serving meanwhile."""
    return await asyncio.to_thread(
        discover,
        list(plugin_dirs),
        keyring=keyring,
        allow_unsigned=allow_unsigned,
        dev_mode=dev_mode,
        grafana_root_url=grafana_root_url,
        platform=platform,
        strict_permissions=strict_permissions,
    )


# ---------------------------------------------------------------------------------------------
# Finding plugin.json files


@dataclass(slots=True)
class _Found:
    plugin_json: PluginJSON
    directory: Path
    children: list[_Found] = field(default_factory=list)


def plugin_sources(plugins_dir: Path) -> list[Path]:
    """The sources in a plugins directory: each subdirectory or symlink to one, by name."""
    with os.scandir(plugins_dir) as entries:
        return [
            Path(entry.path) for entry in sorted(entries, key=lambda e: e.name) if _is_dir(entry)
        ]


def find_plugin_json_files(source: Path) -> tuple[list[Path], list[LoadError]]:
    """Every file named exactly plugin.json under ``source``, following symlinks.

    ``node_modules`` is never entered. A directory reached a second time (through a symlink
    loop, or two links to one place) is skipped, so a loop cannot hang the walk.
    """
    found: list[Path] = []
    errors: list[LoadError] = []
    visited = {os.path.realpath(source)}
    # Grafana's walker checks the source itself too: a source named node_modules is skipped.
    pending = [] if source.name in _SKIPPED_DIRS else [source]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            errors.append(
                LoadError(
                    None,
                    directory,
                    f"cannot read directory: {exc.strerror}",
                    LoadErrorCode.DIRECTORY_UNREADABLE,
                )
            )
            continue
        subdirs = []
        for entry in entries:
            if entry.name in _SKIPPED_DIRS:
                continue
            if _is_dir(entry):
                real = os.path.realpath(entry.path)
                if real in visited:
                    log.debug("skipping %s: %s was already walked", entry.path, real)
                    continue
                visited.add(real)
                subdirs.append(Path(entry.path))
            elif entry.name == PLUGIN_JSON:
                found.append(Path(entry.path))
        pending.extend(reversed(subdirs))
    # Sorting by directory puts every plugin before the plugins nested inside it.
    found.sort(key=lambda p: p.parent.parts)
    return found, errors


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, like Grafana's walker
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# One discovery run


class _Discovery:
    """The state of one discovery run: options, ids seen so far, and what was found."""

    def __init__(
        self,
        *,
        keyring: KeyRing,
        allow_unsigned: frozenset[str],
        dev_mode: bool,
        grafana_root_url: str | None,
        platform: GoPlatform,
        strict_permissions: bool = True,
    ) -> None:
        self.strict_permissions = strict_permissions
        self.plugins_dir: Path | None = None
        self.keyring = keyring
        self.allow_unsigned = allow_unsigned
        self.dev_mode = dev_mode
        self.grafana_root_url = grafana_root_url
        self.platform = platform
        self.specs: list[PluginSpec] = []
        self.errors: list[LoadError] = []
        self.warnings: list[str] = []
        self.first_seen: dict[str, Path] = {}

    def error(
        self, plugin_id: str | None, path: Path, reason: str, code: LoadErrorCode
    ) -> LoadError:
        failure = LoadError(plugin_id, path, reason, code)
        # The caller reports result.errors; logging them here too would say everything twice.
        log.debug("not loading %s", failure)
        self.errors.append(failure)
        return failure

    def scan_plugins_dir(self, plugins_dir: Path) -> None:
        self.plugins_dir = plugins_dir
        try:
            sources = plugin_sources(plugins_dir)
        except OSError as exc:
            code = (
                LoadErrorCode.PLUGINS_DIR_MISSING
                if isinstance(exc, FileNotFoundError | NotADirectoryError)
                else LoadErrorCode.DIRECTORY_UNREADABLE
            )
            self.error(None, plugins_dir, f"cannot read plugins directory: {exc.strerror}", code)
            return
        for source in sources:
            for bundle in self.find_bundles(source):
                self.admit_bundle(bundle)

    def find_bundles(self, source: Path) -> list[_Found]:
        """The plugins in one source, children grouped under their outermost enclosing plugin."""
        paths, walk_errors = find_plugin_json_files(source)
        for failure in walk_errors:
            self.error(failure.plugin_id, failure.path, failure.reason, failure.code)
        roots: list[_Found] = []
        for path in paths:
            plugin_json = self.read_plugin_json(path)
            if plugin_json is None:
                continue
            found = _Found(plugin_json, path.parent)
            # Paths are sorted, so any enclosing plugin was seen already.
            parent = next((r for r in roots if path.parent.is_relative_to(r.directory)), None)
            if parent is None:
                roots.append(found)
            else:
                parent.children.append(found)
        return roots

    def read_plugin_json(self, path: Path) -> PluginJSON | None:
        try:
            return parse_plugin_json(path.read_bytes())
        except OSError as exc:
            reason = f"cannot read plugin.json: {exc.strerror}"
            self.error(None, path, reason, LoadErrorCode.INVALID_PLUGIN_JSON)
        except PluginJSONError as exc:
            reason = f"invalid plugin.json: {exc}"
            self.error(exc.plugin_id, path, reason, LoadErrorCode.INVALID_PLUGIN_JSON)
        return None

    def admit_bundle(self, root: _Found) -> None:
        duplicate = self.claim_id(root)
        if duplicate is not None:
            self.reject_children(root, duplicate)
            return
        signature = compute_signature(
            root.directory,
            plugin_id=root.plugin_json.id,
            plugin_version=root.plugin_json.version,
            keyring=self.keyring,
            plugin_type=root.plugin_json.type,
            grafana_root_url=self.grafana_root_url,
        )
        parent = self.admit(root.plugin_json, root.directory, signature, parent_id=None)
        if isinstance(parent, LoadError):
            self.reject_children(root, parent)
            return
        children: list[PluginSpec] = []
        for child in root.children:
            if self.claim_id(child) is not None:
                continue
            child_json = child.plugin_json
            if child_json.version is None and root.plugin_json.version is not None:
                child_json = replace(child_json, version=root.plugin_json.version)
            spec = self.admit(
                child_json,
                child.directory,
                inherit_signature(signature, parent_id=root.plugin_json.id),
                parent_id=root.plugin_json.id,
            )
            if isinstance(spec, PluginSpec):
                children.append(spec)
        self.specs.append(replace(parent, children=tuple(c.id for c in children)))
        self.specs.extend(children)

    def claim_id(self, found: _Found) -> LoadError | None:
        """Record the first directory providing an id; any later copy is an error."""
        plugin_id = found.plugin_json.id
        first = self.first_seen.setdefault(plugin_id, found.directory)
        if first == found.directory:
            return None
        return self.error(
            plugin_id,
            found.directory,
            f"duplicate plugin id: already found in {first}; this copy is not loaded",
            LoadErrorCode.DUPLICATE_PLUGIN,
        )

    def reject_children(self, root: _Found, cause: LoadError) -> None:
        # Children are loaded through their parent (and signed by its manifest): none without it.
        for child in root.children:
            self.error(
                child.plugin_json.id,
                child.directory,
                f"not loaded because its parent plugin {root.plugin_json.id!r} was not loaded "
                f"({cause.reason})",
                LoadErrorCode.PARENT_NOT_LOADED,
            )

    def admit(
        self,
        plugin_json: PluginJSON,
        directory: Path,
        signature: PluginSignature,
        *,
        parent_id: str | None,
    ) -> PluginSpec | LoadError:
        """The plugin's spec if its signature and executable allow loading it, else the error."""
        decision = loading_decision(
            plugin_json.id,
            signature,
            dev_mode=self.dev_mode,
            allow_unsigned=self.allow_unsigned,
        )
        if not decision.load:
            code = _SIGNATURE_CODES.get(signature.status, LoadErrorCode.SIGNATURE_INVALID)
            return self.error(plugin_json.id, directory, decision.reason, code)
        if decision.warning:
            self.warnings.append(decision.warning)

        executable = None
        digest: str | None = None
        if plugin_json.backend:
            executable = directory / executable_name(
                plugin_json.executable or "",
                plugin_json.type,
                self.platform.goos,
                self.platform.goarch,
            )
            problem = check_executable(executable, self.platform)
            if problem is not None:
                reason, code = problem
                return self.error(plugin_json.id, executable, reason, code)
            unsafe = (
                check_permissions(executable, directory, self.plugins_dir)
                if self.strict_permissions
                else None
            )
            if unsafe is not None:
                path, reason = unsafe
                return self.error(plugin_json.id, path, reason, LoadErrorCode.UNSAFE_PERMISSIONS)
            try:
                digest = self.executable_digest(executable, signature)
            except OSError as exc:
                reason = f"executable {executable} cannot be read: {exc.strerror or exc}"
                return self.error(
                    plugin_json.id, executable, reason, LoadErrorCode.EXECUTABLE_NOT_EXECUTABLE
                )
        return PluginSpec(
            plugin_json=plugin_json,
            directory=directory,
            executable=executable,
            signature=signature,
            parent_id=parent_id,
            executable_sha256=digest,
        )

    def executable_digest(self, executable: Path, signature: PluginSignature) -> str | None:
        """What ``executable`` must hash to whenever it is started (see PluginSpec)."""
        listed = manifest_digest(signature, executable)
        if listed is not None:
            return listed
        if self.dev_mode and signature.status is SignatureStatus.UNSIGNED:
            return None  # rebuilt in place while developing: run whatever is there
        return sha256_file(executable)


# ---------------------------------------------------------------------------------------------
# The executable


def check_executable(path: Path, platform: GoPlatform) -> tuple[str, LoadErrorCode] | None:
    """Why ``path`` cannot be started on ``platform`` as a plugin binary, or None if it can."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return _missing_executable(path, platform), LoadErrorCode.EXECUTABLE_MISSING
    except OSError as exc:
        return f"cannot inspect executable {path}: {exc.strerror}", (
            LoadErrorCode.EXECUTABLE_NOT_REGULAR_FILE
        )
    if not stat.S_ISREG(info.st_mode):
        return (
            f"executable {path} is not a regular file ({_file_kind(info.st_mode)})",
            LoadErrorCode.EXECUTABLE_NOT_REGULAR_FILE,
        )
    if not os.access(path, os.X_OK):
        return (
            f"executable {path} is not executable by this process (mode "
            f"{stat.filemode(info.st_mode)}, owner uid {info.st_uid}, we run as uid "
            f"{os.geteuid()}); make it executable with chmod +x",
            LoadErrorCode.EXECUTABLE_NOT_EXECUTABLE,
        )
    if not platform.uses_elf:
        # Mach-O and PE binaries are not inspected; exec will report what is wrong.
        return None
    try:
        with path.open("rb") as f:
            header = parse_binary_header(f.read(_HEADER_BYTES))
    except OSError as exc:
        return f"cannot read executable {path}: {exc.strerror}", (
            LoadErrorCode.EXECUTABLE_NOT_EXECUTABLE
        )
    needed = platform.elf_machine
    if header.format is BinaryFormat.SCRIPT:
        return None
    if header.format is BinaryFormat.OTHER:
        return (
            f"executable {path} is {header.describe()}; expected an ELF executable for "
            f"{platform.goos}/{platform.goarch}",
            LoadErrorCode.EXECUTABLE_WRONG_FORMAT,
        )
    if needed is not None and header.elf_machine != needed:
        return (
            f"executable {path} is {header.describe()}, but this machine "
            f"({platform.goos}/{platform.goarch}) needs {elf_machine_name(needed)}",
            LoadErrorCode.EXECUTABLE_WRONG_ARCHITECTURE,
        )
    return None


_MAX_CHECKED_ENTRIES = 20_000


def check_permissions(
    executable: Path, directory: Path, plugins_dir: Path | None = None
) -> tuple[Path, str] | None:
    """The first path that lets someone else change what runs as a plugin, and why; or None.

    As sshd's ``StrictModes``: the executable, every directory above it up to ``/``, and
    every file and directory in the plugin's directory must be owned by root or by the user
    the bridge runs as, and must not be writable by group or others. A directory above the
    plugins directory with the sticky bit (``/tmp``) may be world-writable: nobody else can
    rename what it holds. (The plugins directory itself may not: anyone could add a plugin.)
    The same holds for the directories above the plugin directory and the plugins directory
    as given, so a plugin reached through a symlink is checked where the link lives too. A
    plugin directory with more than ``_MAX_CHECKED_ENTRIES`` entries is refused, not trusted.
    ``plugins.strict_permissions: false`` turns the check off (docs/security.md).
    """
    me = os.geteuid()
    top = Path(os.path.realpath(directory))
    inside = {top}
    starts = [executable, directory]
    if plugins_dir is not None:
        inside.add(Path(os.path.realpath(plugins_dir)))
        starts.append(plugins_dir)
    for path, allow_sticky in _ancestry(starts, inside):
        problem = _unsafe(path, me, allow_sticky=allow_sticky)
        if problem is not None:
            return path, problem
    checked = 0
    for current, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for name in (*dirs, *files):
            checked += 1
            if checked > _MAX_CHECKED_ENTRIES:
                # What was not checked is not trusted.
                return top, (
                    f"refusing to run a plugin from here: {top} holds more than "
                    f"{_MAX_CHECKED_ENTRIES} files and directories, too many to check that no "
                    f"one else can write to them; set plugins.strict_permissions: false"
                )
            path = Path(current) / name
            problem = _unsafe(path, me, allow_sticky=False, follow=False)
            if problem is not None:
                return path, problem
    return None


def _ancestry(starts: list[Path], inside: set[Path]) -> list[tuple[Path, bool]]:
    """Every path from each of ``starts`` (resolved) up to ``/``, and whether sticky will do.

    The executable's own chain is not enough when links are involved: a link to the plugin,
    or an executable that is a link, lives in a directory that must be safe as well, or
    whoever can write there could point it elsewhere. Sticky is no excuse from the plugins
    directory down; above it, a sticky world-writable directory (``/tmp``) is fine.
    """
    order: list[Path] = []
    sticky_ok: dict[Path, bool] = {}
    for start in starts:
        real = Path(os.path.realpath(start))
        chain = [real, *real.parents]
        lowest_allowed = max((chain.index(p) for p in inside if p in chain), default=0) + 1
        for index, path in enumerate(chain):
            allowed = index >= lowest_allowed
            if path not in sticky_ok:
                order.append(path)
                sticky_ok[path] = allowed
            else:
                sticky_ok[path] = sticky_ok[path] and allowed
    return [(path, sticky_ok[path]) for path in order]


def _unsafe(path: Path, me: int, *, allow_sticky: bool, follow: bool = True) -> str | None:
    try:
        info = path.stat() if follow else path.lstat()
    except OSError as exc:
        return f"cannot check permissions of {path}: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return None  # the link itself cannot be written; where it points is checked on use
    what = "directory" if stat.S_ISDIR(info.st_mode) else "file"
    if info.st_uid not in (0, me):
        return (
            f"refusing to run a plugin from here: {what} {path} is owned by uid "
            f"{info.st_uid}{_user_name(info.st_uid)}, not by root or by the bridge's user (uid "
            f"{me}), so that user could change what the bridge executes; fix the ownership "
            f"(chown) or set plugins.strict_permissions: false"
        )
    sticky_ok = allow_sticky and stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & 0o022 and not sticky_ok:
        who = " and ".join(
            w for w, bit in (("group", 0o020), ("others", 0o002)) if info.st_mode & bit
        )
        return (
            f"refusing to run a plugin from here: {what} {path} is writable by {who} (mode "
            f"{stat.filemode(info.st_mode)}), so they could change what the bridge executes; "
            f"run chmod go-w {path}, or set plugins.strict_permissions: false"
        )
    return None


def _user_name(uid: int) -> str:
    try:
        import pwd  # noqa: PLC0415 - POSIX only

        return f" ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return ""


def _missing_executable(path: Path, platform: GoPlatform) -> str:
    message = f"executable {path} does not exist (none built for {platform.goos}/{platform.goarch})"
    # Listing the binaries that are there usually shows the mistake at once.
    stem = path.name.removesuffix(".exe").rsplit("_", 2)[0]
    try:
        others = sorted(
            p.name for p in path.parent.iterdir() if p.name.startswith(f"{stem}_") and p != path
        )
    except OSError:
        others = []
    if others:
        message += f"; found: {', '.join(others[:6])}"
    return message


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
