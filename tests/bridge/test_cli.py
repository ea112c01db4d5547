"""The ``grafana-bridge`` console script: ``plugins list|check``, usage and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from plugin_host.platform import GoPlatform
from tests.conftest import FIXTURE_PLUGINS
from tests.helpers import GO_FIXTURE_ID, PY_FIXTURE_ID

GRAFANA_BRIDGE = Path(sys.executable).with_name("grafana-bridge")
BOTH_FIXTURES = f"{GO_FIXTURE_ID},{PY_FIXTURE_ID}"

pytestmark = pytest.mark.go


def grafana_bridge(
    *args: str | Path, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script with no ``BRIDGE_*`` variable but those in ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    environ.update(env or {})
    return subprocess.run(
        [str(GRAFANA_BRIDGE), *map(str, args)],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


def write_plugin(directory: Path, plugin_json: dict[str, Any] | str) -> Path:
    directory.mkdir(parents=True)
    text = plugin_json if isinstance(plugin_json, str) else json.dumps(plugin_json, indent=2)
    (directory / "plugin.json").write_text(text, encoding="utf-8")
    return directory


def datasource(plugin_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "type": "datasource",
        "name": plugin_id,
        "info": {"version": "1.2.3"},
    } | fields


@pytest.fixture(autouse=True)
def _go_fixture_built(go_fixture_binary: Path) -> None:
    """fixtures/plugins is only complete once the Go fixture's binary is there."""


def test_console_script_is_installed() -> None:
    assert GRAFANA_BRIDGE.is_file(), (
        f"{GRAFANA_BRIDGE} missing; install the project (pip install -e .)"
    )


# -- the fixture plugins ---------------------------------------------------------------------


def test_list_without_allow_list_reports_both_unsigned(tmp_path: Path) -> None:
    result = grafana_bridge("plugins", "list", "--plugins", FIXTURE_PLUGINS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "VERSION", "SIGNATURE", "EXECUTABLE"]
    assert "2 plugin(s) cannot be loaded:" in lines
    for plugin_id in (GO_FIXTURE_ID, PY_FIXTURE_ID):
        reason = next(line for line in lines if line.startswith(f"  plugin {plugin_id}: "))
        assert "plugin is unsigned" in reason
        assert f"add '{plugin_id}' to allow_unsigned" in reason


def test_check_fails_and_prints_the_reasons(tmp_path: Path) -> None:
    result = grafana_bridge("plugins", "check", "--plugins", FIXTURE_PLUGINS, cwd=tmp_path)
    assert result.returncode == 1
    assert f"plugin {GO_FIXTURE_ID}: plugin is unsigned" in result.stdout
    assert f"plugin {PY_FIXTURE_ID}: plugin is unsigned" in result.stdout
    assert result.stderr == ""


def test_check_with_allow_list_lists_both_with_executables(tmp_path: Path) -> None:
    result = grafana_bridge(
        "plugins",
        "check",
        "--plugins",
        FIXTURE_PLUGINS,
        "--allow-unsigned",
        BOTH_FIXTURES,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()[1:]
        if line.startswith("bridge-")
    }
    assert sorted(rows) == [GO_FIXTURE_ID, PY_FIXTURE_ID]
    for plugin_id, directory, stem in [
        (GO_FIXTURE_ID, "go-datasource", "gpx_gofixture_"),
        (PY_FIXTURE_ID, "python-datasource", "gpx_pyfixture_"),
    ]:
        _, kind, version, signature, executable = rows[plugin_id]
        assert (kind, version, signature) == ("datasource", "1.0.0", "unsigned")
        assert Path(executable).parent == FIXTURE_PLUGINS / directory
        assert Path(executable).name.startswith(stem)
        assert Path(executable).is_file()
    assert "cannot be loaded" not in result.stdout
    assert result.stdout.count("warning: loading unsigned plugin") == 2


def test_json_without_allow_list(tmp_path: Path) -> None:
    result = grafana_bridge("plugins", "list", "--json", "--plugins", FIXTURE_PLUGINS, cwd=tmp_path)
    assert result.returncode == 0
    doc = as_json(result)
    assert doc["plugins"] == []
    assert doc["warnings"] == []
    assert [(e["id"], e["code"]) for e in doc["errors"]] == [
        (GO_FIXTURE_ID, "signatureMissing"),
        (PY_FIXTURE_ID, "signatureMissing"),
    ]
    assert doc["errors"][0]["path"] == str(FIXTURE_PLUGINS / "go-datasource")


def test_json_with_allow_list(tmp_path: Path) -> None:
    result = grafana_bridge(
        "plugins",
        "check",
        "--json",
        "--plugins",
        FIXTURE_PLUGINS,
        "--allow-unsigned",
        BOTH_FIXTURES,
        cwd=tmp_path,
    )
    assert result.returncode == 0
    doc = as_json(result)
    assert doc["errors"] == []
    assert len(doc["warnings"]) == 2
    by_id = {p["id"]: p for p in doc["plugins"]}
    assert sorted(by_id) == [GO_FIXTURE_ID, PY_FIXTURE_ID]
    go = by_id[GO_FIXTURE_ID]
    assert go["type"] == "datasource"
    assert go["version"] == "1.0.0"
    assert go["directory"] == str(FIXTURE_PLUGINS / "go-datasource")
    assert go["signature"] == "unsigned"
    assert go["signatureDetail"].startswith("no MANIFEST.txt")
    assert go["parent"] is None
    for plugin in by_id.values():
        assert Path(plugin["executable"]).is_file()


def test_allow_list_from_the_environment(tmp_path: Path) -> None:
    result = grafana_bridge(
        "plugins",
        "check",
        "--json",
        cwd=tmp_path,
        env={
            "BRIDGE_PLUGINS__DIRECTORIES": f"[{FIXTURE_PLUGINS}]",
            "BRIDGE_PLUGINS__ALLOW_UNSIGNED": f"[{GO_FIXTURE_ID}, {PY_FIXTURE_ID}]",
        },
    )
    assert result.returncode == 0, result.stdout
    assert len(as_json(result)["plugins"]) == 2


def test_config_file_directories_are_relative_to_the_file(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "plugins").symlink_to(FIXTURE_PLUGINS)
    config = etc / "bridge.yaml"
    config.write_text(f"plugins:\n  directories: [plugins]\n  allow_unsigned: [{GO_FIXTURE_ID}]\n")
    result = grafana_bridge("plugins", "list", "--json", "-c", config, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = as_json(result)
    assert [p["id"] for p in doc["plugins"]] == [GO_FIXTURE_ID]
    assert [e["id"] for e in doc["errors"]] == [PY_FIXTURE_ID]


# -- plugins that cannot load ----------------------------------------------------------------


def test_plugins_that_cannot_load(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins / "a-broken",
        '{\n  "id": "broken-datasource",\n  "type": "datasource"\n  "name": "x"\n}\n',
    )
    write_plugin(
        plugins / "b-no-binary",
        datasource("nobinary-datasource", backend=True, executable="gpx_missing"),
    )
    write_plugin(plugins / "c-first", datasource("twin-datasource"))
    write_plugin(plugins / "d-second", datasource("twin-datasource"))
    write_plugin(plugins / "e-frontend", datasource("frontend-datasource"))
    allow = "nobinary-datasource,twin-datasource,frontend-datasource"

    result = grafana_bridge(
        "plugins", "check", "--plugins", plugins, "--allow-unsigned", allow, cwd=tmp_path
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    frontend = next(line for line in lines if line.startswith("frontend-datasource"))
    assert frontend.split()[1:4] == ["datasource", "1.2.3", "unsigned"]
    assert frontend.endswith("(no backend)")
    twin = [line for line in lines if line.startswith("twin-datasource")]
    assert len(twin) == 1
    assert "3 plugin(s) cannot be loaded:" in lines
    assert (
        f"  {plugins / 'a-broken' / 'plugin.json'}: invalid plugin.json: invalid JSON at line 4 "
        "column 3: Expecting ',' delimiter"
    ) in lines
    assert (
        f"  plugin twin-datasource: duplicate plugin id: already found in {plugins / 'c-first'}; this copy is not loaded"
        in lines
    )
    here = GoPlatform.current()
    binary = plugins / "b-no-binary" / f"gpx_missing_{here.goos}_{here.goarch}"
    assert (
        f"  plugin nobinary-datasource: executable {binary} does not exist "
        f"(none built for {here.goos}/{here.goarch})"
    ) in lines

    doc = as_json(
        grafana_bridge(
            "plugins",
            "check",
            "--json",
            "--plugins",
            plugins,
            "--allow-unsigned",
            allow,
            cwd=tmp_path,
        )
    )
    assert [(e["id"], e["code"]) for e in doc["errors"]] == [
        (None, "invalidPluginJson"),
        ("nobinary-datasource", "executableMissing"),
        ("twin-datasource", "duplicatePlugin"),
    ]
    assert sorted(p["id"] for p in doc["plugins"]) == ["frontend-datasource", "twin-datasource"]
    twin_json = next(p for p in doc["plugins"] if p["id"] == "twin-datasource")
    assert twin_json["directory"] == str(plugins / "c-first")
    assert twin_json["executable"] is None


def test_invalid_plugin_json_names_the_plugin_when_it_can(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins / "p", {"id": "typo-datasource", "type": "datasorce"})
    result = grafana_bridge("plugins", "check", "--plugins", plugins, cwd=tmp_path)
    assert result.returncode == 1
    assert (
        '  plugin typo-datasource: invalid plugin.json: "type" must be one of '
        "app|datasource|panel|renderer|secretsmanager, got 'datasorce'"
    ) in result.stdout.splitlines()


def test_missing_plugins_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    listed = grafana_bridge("plugins", "list", "--plugins", missing, cwd=tmp_path)
    checked = grafana_bridge("plugins", "check", "--plugins", missing, cwd=tmp_path)
    assert (listed.returncode, checked.returncode) == (0, 1)
    assert (
        f"  {missing}: cannot read plugins directory: No such file or directory" in checked.stdout
    )


# -- usage and configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    "args", [(), ("plugins",)], ids=["no command", "plugins without subcommand"]
)
def test_usage_without_a_command(args: tuple[str, ...], tmp_path: Path) -> None:
    result = grafana_bridge(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: grafana-bridge" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    result = grafana_bridge("plugins", "list", "--frobnicate", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        (
            "plugins:\n  start_timeout: -5\n",
            {},
            "plugins.start_timeout: Input should be greater than 0 (got -5)",
        ),
        ("plugins:\n  allow_unsignd: [a]\n", {}, "plugins.allow_unsignd: unknown key"),
        ("server: {listen: [1, 2\n", {}, "is not valid YAML at line 2, column 1"),
        (
            "",
            {"BRIDGE_PLUGINS__STOP_GRACE": "soon"},
            "plugins.stop_grace: Input should be a valid number, unable to parse string as a number "
            "(got 'soon'), set by environment variable BRIDGE_PLUGINS__STOP_GRACE",
        ),
    ],
    ids=["negative timeout", "unknown key", "YAML syntax", "env value"],
)
@pytest.mark.parametrize("command", [("plugins", "list"), ("plugins", "check")], ids=" ".join)
def test_bad_config_exits_2_with_one_message(
    command: tuple[str, ...], text: str, env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(text)
    result = grafana_bridge(*command, "-c", config, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("grafana-bridge: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = grafana_bridge("plugins", "list", "-c", tmp_path / "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr
        == f"grafana-bridge: cannot read config file {tmp_path / 'nope.yaml'}: No such file or directory\n"
    )


def test_bad_public_key_file(tmp_path: Path) -> None:
    key = tmp_path / "extra.asc"
    key.write_text("not a key\n")
    result = grafana_bridge(
        "plugins",
        "list",
        "--plugins",
        FIXTURE_PLUGINS,
        cwd=tmp_path,
        env={"BRIDGE_PLUGINS__PUBLIC_KEYS": f"[{key}]"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"grafana-bridge: {key} is not an OpenPGP key")
    assert "Traceback" not in result.stderr
