"""Plugin discovery: one row per behaviour, each building its plugin directories in tmp_path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from plugin_host.discovery import (
    DiscoveryResult,
    LoadError,
    LoadErrorCode,
    PluginClass,
    discover,
    discover_async,
    find_plugin_json_files,
)
from plugin_host.platform import GoPlatform
from plugin_host.signature import SignatureStatus
from tests.plugin_host.signing import (
    EM_AARCH64,
    SigningKey,
    elf_header,
    generate_test_key,
    make_signed_plugin,
    write_plugin,
)

LINUX_AMD64 = GoPlatform(goos="linux", goarch="amd64")


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_test_key("p521")


def run(
    plugins: Path,
    key: SigningKey,
    *,
    dirs: list[Path] | None = None,
    allow_unsigned: frozenset[str] = frozenset(),
    dev_mode: bool = False,
) -> DiscoveryResult:
    return discover(
        dirs if dirs is not None else [plugins],
        keyring=key.keyring(),
        allow_unsigned=allow_unsigned,
        dev_mode=dev_mode,
        platform=LINUX_AMD64,
    )


def only_error(result: DiscoveryResult) -> LoadError:
    assert len(result.errors) == 1, [str(e) for e in result.errors]
    return result.errors[0]


# --- executables: one row each ---------------------------------------------------------------


@dataclass(frozen=True)
class ExecutableCase:
    code: LoadErrorCode | None  # None: the plugin loads
    reason: str  # a fragment of the reason (or of the executable path when it loads)
    binary: bytes | None = None
    mode: int = 0o755
    binary_name: str = "gpx_acme_linux_amd64"
    plugin_type: str = "datasource"
    as_directory: bool = False


EXECUTABLE_CASES = {
    "x86-64 ELF loads": ExecutableCase(None, "gpx_acme_linux_amd64"),
    "#! script loads": ExecutableCase(None, "gpx_acme_linux_amd64", binary=b"#!/bin/sh\n"),
    "renderer uses plugin_start": ExecutableCase(
        None,
        "plugin_start_linux_amd64",
        binary_name="plugin_start_linux_amd64",
        plugin_type="renderer",
    ),
    "secrets manager uses secrets_plugin_start": ExecutableCase(
        None,
        "secrets_plugin_start_linux_amd64",
        binary_name="secrets_plugin_start_linux_amd64",
        plugin_type="secretsmanager",
    ),
    "missing, other builds listed": ExecutableCase(
        LoadErrorCode.EXECUTABLE_MISSING,
        "gpx_acme_linux_amd64 does not exist (none built for linux/amd64); "
        "found: gpx_acme_linux_arm64",
        binary_name="gpx_acme_linux_arm64",
    ),
    "not executable": ExecutableCase(
        LoadErrorCode.EXECUTABLE_NOT_EXECUTABLE,
        "is not executable by this process (mode -rw-r--r--",
        mode=0o644,
    ),
    "a directory": ExecutableCase(
        LoadErrorCode.EXECUTABLE_NOT_REGULAR_FILE,
        "is not a regular file (a directory)",
        as_directory=True,
    ),
    "aarch64 ELF on amd64": ExecutableCase(
        LoadErrorCode.EXECUTABLE_WRONG_ARCHITECTURE,
        "is a 64-bit ELF file for aarch64 (e_machine 183), but this machine (linux/amd64) "
        "needs x86-64 (e_machine 62)",
        binary=elf_header(EM_AARCH64),
    ),
    "32-bit ARM ELF on amd64": ExecutableCase(
        LoadErrorCode.EXECUTABLE_WRONG_ARCHITECTURE,
        "is a 32-bit ELF file for arm (e_machine 40)",
        binary=elf_header(40, bits=32),
    ),
    "Mach-O binary": ExecutableCase(
        LoadErrorCode.EXECUTABLE_WRONG_FORMAT,
        "is not an ELF file or #! script (starts with b'\\xcf\\xfa\\xed\\xfe",
        binary=b"\xcf\xfa\xed\xfe\x07\x00\x00\x01" + bytes(56),
    ),
    "empty file": ExecutableCase(
        LoadErrorCode.EXECUTABLE_WRONG_FORMAT, "is not an ELF file or #! script", binary=b""
    ),
}


@pytest.mark.parametrize("case", EXECUTABLE_CASES.values(), ids=EXECUTABLE_CASES.keys())
def test_executable_checks(case: ExecutableCase, key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme",
        plugin_id="acme-test-datasource",
        plugin_type=case.plugin_type,
        backend=True,
        executable="gpx_acme",
        binary=case.binary,
        binary_name=case.binary_name,
    )
    binary = plugin_dir / case.binary_name
    if case.as_directory:
        binary.unlink()
        binary.mkdir()
        (binary / "inner").write_text("x")
    binary.chmod(case.mode)
    make_signed_plugin(plugin_dir, key)

    result = run(tmp_path / "plugins", key)

    if case.code is None:
        assert result.errors == ()
        (spec,) = result.plugins
        assert spec.executable == plugin_dir / case.reason
    else:
        error = only_error(result)
        assert error.code is case.code
        assert error.plugin_id == "acme-test-datasource"
        assert case.reason in error.reason
        assert str(plugin_dir / "gpx_acme_linux_amd64") in error.reason or case.as_directory


def test_missing_executable_names_the_full_expected_path(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme",
        plugin_id="acme-test-datasource",
        backend=True,
        binary_name="unrelated",
    )
    make_signed_plugin(plugin_dir, key)

    error = only_error(run(tmp_path / "plugins", key))

    expected = plugin_dir / "gpx_acme-test-datasource_linux_amd64"
    assert error.reason == f"executable {expected} does not exist (none built for linux/amd64)"
    assert error.path == expected


# --- plugin.json problems: one row each ------------------------------------------------------

PLUGIN_JSON_CASES: dict[str, tuple[str, str | None, str]] = {
    "bad JSON": (
        '{\n  "id": "acme-x-panel",\n  "type": "panel"\n  "name": "x"\n}',
        None,
        "invalid plugin.json: invalid JSON at line 4 column 3: Expecting ',' delimiter",
    ),
    "not an object": ("[1, 2]", None, "top level must be a JSON object, got an array"),
    "missing id": ('{"type": "panel"}', None, '"id" is required and must be a non-empty string'),
    "blank id": ('{"id": " ", "type": "panel"}', None, '"id" is required'),
    "unknown type": (
        '{"id": "acme-x-transformer", "type": "transformer"}',
        "acme-x-transformer",
        "\"type\" must be one of app|datasource|panel|renderer|secretsmanager, got 'transformer'",
    ),
    "backend without executable": (
        '{"id": "acme-x-datasource", "type": "datasource", "backend": true}',
        "acme-x-datasource",
        '"backend" is true but "executable" is missing',
    ),
    "backend is a string": (
        '{"id": "acme-x-datasource", "type": "datasource", "backend": "yes"}',
        "acme-x-datasource",
        '"backend" must be a boolean, got a string',
    ),
    "version is a number": (
        '{"id": "acme-x-panel", "type": "panel", "info": {"version": 1}}',
        "acme-x-panel",
        '"info.version" must be a string, got a number',
    ),
    "routes not a list of objects": (
        '{"id": "acme-x-datasource", "type": "datasource", "routes": ["x"]}',
        "acme-x-datasource",
        '"routes[0]" must be an object, got a string',
    ),
    "executable escapes the plugin dir": (
        '{"id": "acme-x-datasource", "type": "datasource", "backend": true,'
        ' "executable": "../../bin/sh"}',
        "acme-x-datasource",
        "\"executable\" must be a name inside the plugin directory, got '../../bin/sh'",
    ),
}


@pytest.mark.parametrize("row", PLUGIN_JSON_CASES.values(), ids=PLUGIN_JSON_CASES.keys())
def test_invalid_plugin_json(
    row: tuple[str, str | None, str], key: SigningKey, tmp_path: Path
) -> None:
    text, plugin_id, reason = row
    plugin_dir = tmp_path / "plugins" / "acme"
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "plugin.json").write_text(text)

    result = run(tmp_path / "plugins", key, dev_mode=True)

    assert result.plugins == ()
    error = only_error(result)
    assert error.code is LoadErrorCode.INVALID_PLUGIN_JSON
    assert error.path == plugin_dir / "plugin.json"
    assert error.plugin_id == plugin_id
    assert reason in error.reason


# --- layout and signature behaviours ---------------------------------------------------------


def test_signed_backend_plugin_loads(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme",
        plugin_id="acme-test-datasource",
        backend=True,
        extra={"alerting": True, "dependencies": {"grafanaDependency": ">=10.0.0"}},
    )
    make_signed_plugin(plugin_dir, key)

    result = run(tmp_path / "plugins", key)

    assert result.errors == ()
    (spec,) = result.plugins
    assert spec.id == "acme-test-datasource"
    assert spec.directory == plugin_dir
    assert spec.executable == plugin_dir / "gpx_acme-test-datasource_linux_amd64"
    assert spec.signature.status is SignatureStatus.VALID
    assert spec.class_ is PluginClass.EXTERNAL
    assert spec.plugin_json.alerting is True
    assert spec.plugin_json.grafana_dependency == ">=10.0.0"
    assert (spec.parent_id, spec.children) == (None, ())


def test_non_backend_plugin_is_listed_without_executable(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "panel", plugin_id="acme-x-panel", plugin_type="panel"
    )
    make_signed_plugin(plugin_dir, key)

    (spec,) = run(tmp_path / "plugins", key).plugins

    assert spec.id == "acme-x-panel"
    assert spec.executable is None


def test_nested_plugins_become_children_of_the_outermost(key: SigningKey, tmp_path: Path) -> None:
    app = write_plugin(
        tmp_path / "plugins" / "app", plugin_id="acme-x-app", plugin_type="app", version="2.1.0"
    )
    write_plugin(
        app / "datasources" / "ds",
        plugin_id="acme-x-datasource",
        version=None,
        backend=True,
    )
    write_plugin(
        app / "datasources" / "ds" / "panels" / "p", plugin_id="acme-x-panel", plugin_type="panel"
    )
    make_signed_plugin(app, key)

    result = run(tmp_path / "plugins", key)

    assert result.errors == ()
    parent, datasource, panel = result.plugins
    assert parent.id == "acme-x-app"
    assert parent.children == ("acme-x-datasource", "acme-x-panel")
    assert (datasource.parent_id, panel.parent_id) == ("acme-x-app", "acme-x-app")
    assert datasource.version == "2.1.0"  # inherited: its own plugin.json has none
    assert panel.version == "1.0.0"  # its own
    assert datasource.signature.status is SignatureStatus.VALID
    assert datasource.signature.inherited_from == "acme-x-app"
    assert datasource.executable == app / "datasources" / "ds" / "gpx_acme-x-datasource_linux_amd64"


def test_children_of_a_refused_parent_are_refused(key: SigningKey, tmp_path: Path) -> None:
    app = write_plugin(tmp_path / "plugins" / "app", plugin_id="acme-x-app", plugin_type="app")
    write_plugin(app / "ds", plugin_id="acme-x-datasource")
    make_signed_plugin(app, key)
    (app / "ds" / "added.js").write_text("x")

    result = run(tmp_path / "plugins", key)

    assert result.plugins == ()
    parent_error, child_error = result.errors
    assert parent_error.code is LoadErrorCode.SIGNATURE_MODIFIED
    assert parent_error.reason == (
        "signature is modified: file ds/added.js is not listed in MANIFEST.txt"
    )
    assert child_error.code is LoadErrorCode.PARENT_NOT_LOADED
    assert child_error.plugin_id == "acme-x-datasource"
    assert "parent plugin 'acme-x-app' was not loaded (signature is modified" in child_error.reason


def test_unsigned_child_of_allowed_parent_needs_its_own_allowance(
    key: SigningKey, tmp_path: Path
) -> None:
    app = write_plugin(tmp_path / "plugins" / "app", plugin_id="acme-x-app", plugin_type="app")
    write_plugin(app / "ds", plugin_id="acme-x-datasource")

    result = run(tmp_path / "plugins", key, allow_unsigned=frozenset({"acme-x-app"}))

    assert [p.id for p in result.plugins] == ["acme-x-app"]
    assert result.plugins[0].children == ()
    error = only_error(result)
    assert (error.plugin_id, error.code) == ("acme-x-datasource", LoadErrorCode.SIGNATURE_MISSING)
    assert "inherited from parent plugin 'acme-x-app'" in error.reason


def test_dist_layout(key: SigningKey, tmp_path: Path) -> None:
    repo = tmp_path / "plugins" / "acme-repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "module.ts").write_text("export {}")
    dist = write_plugin(repo / "dist", plugin_id="acme-test-datasource", backend=True)
    make_signed_plugin(dist, key)

    result = run(tmp_path / "plugins", key)

    assert result.errors == ()
    (spec,) = result.plugins
    assert spec.directory == dist
    assert spec.executable == dist / "gpx_acme-test-datasource_linux_amd64"


def test_node_modules_is_skipped(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme", plugin_id="acme-x-panel", plugin_type="panel"
    )
    write_plugin(plugin_dir / "node_modules" / "dep", plugin_id="dep-x-panel", plugin_type="panel")
    write_plugin(
        tmp_path / "plugins" / "node_modules", plugin_id="top-x-panel", plugin_type="panel"
    )

    result = run(tmp_path / "plugins", key, dev_mode=True)

    assert [p.id for p in result.plugins] == ["acme-x-panel"]
    assert result.plugins[0].children == ()


def test_symlink_loop_does_not_hang(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme", plugin_id="acme-x-panel", plugin_type="panel"
    )
    (plugin_dir / "sub").mkdir()
    (plugin_dir / "sub" / "loop").symlink_to(plugin_dir, target_is_directory=True)
    (plugin_dir / "self").symlink_to(".", target_is_directory=True)

    found, errors = find_plugin_json_files(tmp_path / "plugins" / "acme")
    result = run(tmp_path / "plugins", key, dev_mode=True)

    assert found == [plugin_dir / "plugin.json"]
    assert errors == []
    assert [p.id for p in result.plugins] == ["acme-x-panel"]


def test_symlinked_plugin_dir_is_a_source(key: SigningKey, tmp_path: Path) -> None:
    elsewhere = write_plugin(
        tmp_path / "elsewhere" / "acme", plugin_id="acme-x-panel", plugin_type="panel"
    )
    make_signed_plugin(elsewhere, key)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "acme").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "plugins" / "README.txt").write_text("files at the top level are not sources")

    result = run(tmp_path / "plugins", key)

    assert result.errors == ()
    (spec,) = result.plugins
    assert spec.directory == tmp_path / "plugins" / "acme"
    assert spec.signature.status is SignatureStatus.VALID


def test_duplicate_ids_across_dirs(key: SigningKey, tmp_path: Path) -> None:
    first = write_plugin(tmp_path / "one" / "acme", plugin_id="acme-x-panel", plugin_type="panel")
    second = write_plugin(tmp_path / "two" / "acme", plugin_id="acme-x-panel", plugin_type="panel")
    third = write_plugin(tmp_path / "two" / "again", plugin_id="acme-x-panel", plugin_type="panel")
    for plugin_dir in (first, second, third):
        make_signed_plugin(plugin_dir, key)

    result = run(tmp_path, key, dirs=[tmp_path / "one", tmp_path / "two"])

    (spec,) = result.plugins
    assert spec.directory == first
    assert [e.code for e in result.errors] == [LoadErrorCode.DUPLICATE_PLUGIN] * 2
    assert {e.path for e in result.errors} == {second, third}
    for error in result.errors:
        assert (
            error.reason
            == f"duplicate plugin id: already found in {first}; this copy is not loaded"
        )


SIGNATURE_POLICY = {
    "unsigned refused": (False, frozenset(), LoadErrorCode.SIGNATURE_MISSING),
    "unsigned allowed by id": (False, frozenset({"acme-x-panel"}), None),
    "unsigned allowed in dev mode": (True, frozenset(), None),
    "unsigned, another id allowed": (
        False,
        frozenset({"acme-y-panel"}),
        LoadErrorCode.SIGNATURE_MISSING,
    ),
}


@pytest.mark.parametrize("row", SIGNATURE_POLICY.values(), ids=SIGNATURE_POLICY.keys())
def test_unsigned_plugin_policy(
    row: tuple[bool, frozenset[str], LoadErrorCode | None], key: SigningKey, tmp_path: Path
) -> None:
    dev_mode, allowed, code = row
    write_plugin(tmp_path / "plugins" / "acme", plugin_id="acme-x-panel", plugin_type="panel")

    result = run(tmp_path / "plugins", key, allow_unsigned=allowed, dev_mode=dev_mode)

    if code is None:
        (spec,) = result.plugins
        assert spec.signature.status is SignatureStatus.UNSIGNED
        (warning,) = result.warnings
        assert "loading unsigned plugin 'acme-x-panel'" in warning
    else:
        error = only_error(result)
        assert error.code is code
        assert "plugin is unsigned (no MANIFEST.txt in" in error.reason
        assert result.warnings == ()


@pytest.mark.parametrize("dev_mode", [False, True], ids=["prod", "dev mode"])
def test_modified_plugin_never_loads(dev_mode: bool, key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme", plugin_id="acme-x-panel", plugin_type="panel"
    )
    make_signed_plugin(plugin_dir, key)
    (plugin_dir / "plugin.json").write_text((plugin_dir / "plugin.json").read_text() + "\n")

    result = run(
        tmp_path / "plugins", key, dev_mode=dev_mode, allow_unsigned=frozenset({"acme-x-panel"})
    )

    error = only_error(result)
    assert error.code is LoadErrorCode.SIGNATURE_MODIFIED
    assert error.reason == "signature is modified: file plugin.json is modified: sha256 mismatch"


def test_invalid_signature_never_loads(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme", plugin_id="acme-x-panel", plugin_type="panel"
    )
    make_signed_plugin(plugin_dir, generate_test_key("ed25519"))

    error = only_error(run(tmp_path / "plugins", key, dev_mode=True))

    assert error.code is LoadErrorCode.SIGNATURE_INVALID
    assert error.reason.startswith("signature is invalid: signature made by unknown key id ")


def test_missing_plugins_dir(key: SigningKey, tmp_path: Path) -> None:
    error = only_error(run(tmp_path / "nope", key))

    assert error.code is LoadErrorCode.PLUGINS_DIR_MISSING
    assert error.path == tmp_path / "nope"
    assert error.plugin_id is None
    assert (
        str(error)
        == f"{tmp_path / 'nope'}: cannot read plugins directory: No such file or directory"
    )


def test_unreadable_directory_is_reported(
    key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, which reads any directory; fail the listing itself instead.
    locked = tmp_path / "plugins" / "acme" / "locked"
    locked.mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike[str]) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("plugin_host.discovery.os.scandir", scandir)

    error = only_error(run(tmp_path / "plugins", key))

    assert error.code is LoadErrorCode.DIRECTORY_UNREADABLE
    assert error.path == locked
    assert error.reason == "cannot read directory: Permission denied"


async def test_discover_async_matches_discover(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = write_plugin(
        tmp_path / "plugins" / "acme", plugin_id="acme-test-datasource", backend=True
    )
    make_signed_plugin(plugin_dir, key)

    result = await discover_async(
        [tmp_path / "plugins"], keyring=key.keyring(), platform=LINUX_AMD64
    )

    assert result == run(tmp_path / "plugins", key)
    assert [p.id for p in result.plugins] == ["acme-test-datasource"]
