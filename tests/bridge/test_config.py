"""bridge.config: the YAML file, ``BRIDGE_*`` overrides, command-line overrides, and errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.config import BridgeConfig, ConfigError, load_config
from plugin_host.handshake import GrafanaIdentity
from plugin_host.supervisor import RestartPolicy, SupervisorOptions


def _write(tmp_path: Path, text: str | bytes, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# -- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueCase:
    name: str
    read: Callable[[BridgeConfig], object]
    expected: object
    yaml: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)


VALUE_CASES = [
    # Defaults, with no file and no variables.
    ValueCase("default listen", lambda c: c.server.listen, "127.0.0.1:3100"),
    ValueCase("default host", lambda c: c.server.host, "127.0.0.1"),
    ValueCase("default port", lambda c: c.server.port, 3100),
    ValueCase("default shutdown grace", lambda c: c.server.shutdown_grace, 10.0),
    ValueCase("default directories", lambda c: c.plugins.directories, (Path("data/plugins"),)),
    ValueCase("default allow-list", lambda c: c.plugins.allow_unsigned, frozenset()),
    ValueCase("default start timeout", lambda c: c.plugins.start_timeout, 60.0),
    ValueCase("default memory limit", lambda c: c.plugins.memory_limit_mb, None),
    ValueCase("default backoff", lambda c: c.plugins.restart.initial_backoff, 1.0),
    ValueCase("default grafana version", lambda c: c.grafana.version, "11.3.0"),
    ValueCase("default log level", lambda c: c.logging.level, "info"),
    ValueCase("default log format", lambda c: c.logging.format, "text"),
    ValueCase("empty file is all defaults", lambda c: c, BridgeConfig(), yaml=""),
    ValueCase("comment-only file", lambda c: c, BridgeConfig(), yaml="# nothing yet\n"),
    # Values from the file.
    ValueCase(
        "listen from file",
        lambda c: c.server.listen,
        "0.0.0.0:3200",
        "server: {listen: 0.0.0.0:3200}",
    ),
    ValueCase("all interfaces", lambda c: c.server.host, "0.0.0.0", "server: {listen: ':3200'}"),
    ValueCase("IPv6 host", lambda c: c.server.host, "::1", "server: {listen: '[::1]:3200'}"),
    ValueCase("IPv6 port", lambda c: c.server.port, 3200, "server: {listen: '[::1]:3200'}"),
    ValueCase(
        "allow-list from file",
        lambda c: c.plugins.allow_unsigned,
        frozenset({"a", "b"}),
        "plugins:\n  allow_unsigned:\n    - a\n    - b\n",
    ),
    ValueCase(
        "nested restart key",
        lambda c: c.plugins.restart.max_backoff,
        12.5,
        "plugins: {restart: {max_backoff: 12.5}}",
    ),
    ValueCase(
        "unset keys beside a set one keep defaults",
        lambda c: c.plugins.restart.multiplier,
        2.0,
        "plugins: {restart: {max_backoff: 12.5}}",
    ),
    ValueCase(
        "per-plugin settings",
        lambda c: c.plugins.settings,
        {"my-ds": {"url": "http://x"}},
        "plugins: {settings: {my-ds: {url: 'http://x'}}}",
    ),
    ValueCase(
        "feature toggles",
        lambda c: c.grafana.feature_toggles,
        ("a", "b"),
        "grafana: {feature_toggles: [a, b]}",
    ),
    ValueCase("log format", lambda c: c.logging.format, "json", "logging: {format: json}"),
    # Environment overrides.
    ValueCase(
        "env number",
        lambda c: c.plugins.start_timeout,
        5.0,
        env={"BRIDGE_PLUGINS__START_TIMEOUT": "5"},
    ),
    ValueCase(
        "env flow list",
        lambda c: c.plugins.allow_unsigned,
        frozenset({"a", "b"}),
        env={"BRIDGE_PLUGINS__ALLOW_UNSIGNED": "[a, b]"},
    ),
    ValueCase(
        "env nested section",
        lambda c: c.plugins.restart.initial_backoff,
        0.25,
        env={"BRIDGE_PLUGINS__RESTART__INITIAL_BACKOFF": "0.25"},
    ),
    ValueCase(
        "env boolean", lambda c: c.plugins.dev_mode, True, env={"BRIDGE_PLUGINS__DEV_MODE": "yes"}
    ),
    ValueCase(
        "env flow mapping",
        lambda c: c.plugins.env,
        {"my-ds": {"DEBUG": "1"}},
        env={"BRIDGE_PLUGINS__ENV": "{my-ds: {DEBUG: '1'}}"},
    ),
    ValueCase(
        "env version stays a string",
        lambda c: c.grafana.version,
        "11.10",
        env={"BRIDGE_GRAFANA__VERSION": "11.10"},
    ),
    ValueCase(
        "env bracketed IPv6 listen is a string, not a list",
        lambda c: c.server.port,
        3300,
        env={"BRIDGE_SERVER__LISTEN": "[::1]:3300"},
    ),
    ValueCase(
        "env null unsets",
        lambda c: c.plugins.memory_limit_mb,
        None,
        "plugins: {memory_limit_mb: 256}",
        env={"BRIDGE_PLUGINS__MEMORY_LIMIT_MB": "null"},
    ),
    ValueCase(
        "env wins over the file",
        lambda c: c.plugins.start_timeout,
        5.0,
        "plugins: {start_timeout: 10}",
        env={"BRIDGE_PLUGINS__START_TIMEOUT": "5"},
    ),
    ValueCase(
        "env keeps the file's other keys",
        lambda c: c.plugins.stop_grace,
        0.5,
        "plugins: {start_timeout: 10, stop_grace: 0.5}",
        env={"BRIDGE_PLUGINS__START_TIMEOUT": "5"},
    ),
    ValueCase(
        "variables without the prefix are ignored",
        lambda c: c,
        BridgeConfig(),
        env={"PLUGINS__START_TIMEOUT": "5", "BRIDGE_": "x", "HOME": "/root"},
    ),
    # Command-line overrides.
    ValueCase(
        "command line wins over env",
        lambda c: c.plugins.start_timeout,
        7.0,
        "plugins: {start_timeout: 10}",
        env={"BRIDGE_PLUGINS__START_TIMEOUT": "5"},
        overrides={"plugins.start_timeout": 7},
    ),
    ValueCase(
        "command-line directories replace the file's",
        lambda c: c.plugins.directories,
        (Path("/srv/plugins"),),
        "plugins: {directories: [/opt/a, /opt/b]}",
        overrides={"plugins.directories": ["/srv/plugins"]},
    ),
    ValueCase(
        "command-line listen",
        lambda c: c.server.listen,
        "127.0.0.1:4000",
        env={"BRIDGE_SERVER__LISTEN": "127.0.0.1:3999"},
        overrides={"server.listen": "127.0.0.1:4000"},
    ),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: c.name)
def test_values(case: ValueCase, tmp_path: Path) -> None:
    path = None if case.yaml is None else _write(tmp_path, case.yaml)
    config = load_config(path, environ=case.env, overrides=case.overrides)
    assert case.read(config) == case.expected


def test_no_file_and_no_variables_is_the_default_config() -> None:
    assert load_config(environ={}) == BridgeConfig()


def test_relative_paths_are_taken_from_the_file_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    path = _write(
        etc,
        "server:\n"
        "  tls_cert: tls/cert.pem\n"
        "  tls_key: /abs/key.pem\n"
        "plugins:\n"
        "  directories: [plugins, ../shared, /opt/plugins]\n"
        "  public_keys: [keys/extra.asc]\n",
    )
    config = load_config(path, environ={})
    assert config.plugins.directories == (etc / "plugins", etc / "../shared", Path("/opt/plugins"))
    assert config.plugins.public_keys == (etc / "keys/extra.asc",)
    assert config.server.tls_cert == etc / "tls/cert.pem"
    assert config.server.tls_key == Path("/abs/key.pem")


def test_paths_from_env_and_command_line_stay_as_given(tmp_path: Path) -> None:
    path = _write(tmp_path, "plugins: {directories: [a]}")
    config = load_config(
        path,
        environ={"BRIDGE_PLUGINS__PUBLIC_KEYS": "[keys/k.asc]"},
        overrides={"plugins.directories": ["plugins"]},
    )
    assert config.plugins.directories == (Path("plugins"),)
    assert config.plugins.public_keys == (Path("keys/k.asc"),)


def test_environment_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_PLUGINS__HEALTH_FAILURES", "9")
    assert load_config().plugins.health_failures == 9


# -- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCase:
    name: str
    expected: tuple[str, ...]  # every one of these is in the message
    yaml: str | bytes | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)


ERROR_CASES = [
    ErrorCase(
        "unknown key",
        ("plugins.bogus: unknown key", "docs/configuration.md"),
        "plugins: {bogus: 1}",
    ),
    ErrorCase("unknown section", ("sever: unknown key",), "sever: {listen: ':3100'}"),
    ErrorCase(
        "wrong type",
        ("plugins.start_timeout:", "valid number", "(got 'soon')"),
        "plugins: {start_timeout: soon}",
    ),
    ErrorCase(
        "not a boolean",
        ("plugins.dev_mode:", "valid boolean", "(got 'maybe')"),
        "plugins: {dev_mode: maybe}",
    ),
    ErrorCase(
        "negative timeout",
        ("plugins.start_timeout:", "greater than 0", "(got -1)"),
        "plugins: {start_timeout: -1}",
    ),
    ErrorCase(
        "negative nested backoff",
        ("plugins.restart.initial_backoff:", "greater than 0", "(got -0.5)"),
        "plugins: {restart: {initial_backoff: -0.5}}",
    ),
    ErrorCase(
        "jitter out of range",
        ("plugins.restart.jitter:", "less than 1", "(got 1.5)"),
        "plugins: {restart: {jitter: 1.5}}",
    ),
    ErrorCase(
        "listen without a port",
        ("server.listen: expected host:port", "(got 'localhost')"),
        "server: {listen: localhost}",
    ),
    ErrorCase(
        "listen port out of range",
        ("server.listen: expected host:port", "(got ':70000')"),
        "server: {listen: ':70000'}",
    ),
    ErrorCase(
        "unknown log level",
        ("logging.level:", "'debug'", "(got 'loud')"),
        "logging: {level: loud}",
    ),
    ErrorCase("section is not a mapping", ("plugins:", "(got 3)"), "plugins: 3"),
    ErrorCase(
        "several errors at once",
        ("server.listen:", "plugins.stop_grace:", "plugins.typo: unknown key"),
        "server: {listen: nope}\nplugins: {stop_grace: -1, typo: 1}",
    ),
    ErrorCase(
        "version as a YAML number",
        ("grafana.version:", "valid string", "(got 11.1)"),
        "grafana: {version: 11.10}",
    ),
    ErrorCase(
        "YAML syntax error",
        ("is not valid YAML at line 3, column 11", "expected ',' or ']'"),
        "plugins:\n  directories: [a, b\n  dev_mode: true\n",
    ),
    ErrorCase(
        "tab indentation",
        ("is not valid YAML at line 2, column 1", "'\\t'"),
        "server:\n\tlisten: x\n",
    ),
    ErrorCase(
        "top level is a list", ("the top level must be a mapping of sections",), "- a\n- b\n"
    ),
    ErrorCase("top level is a scalar", ("the top level must be a mapping of sections",), "hello\n"),
    ErrorCase("not UTF-8", ("is not UTF-8 text", "at byte 17"), b"server: {listen: \xff}\n"),
    ErrorCase(
        "bad value from env names the variable",
        (
            "plugins.start_timeout:",
            "(got '-1')",
            "set by environment variable BRIDGE_PLUGINS__START_TIMEOUT",
        ),
        env={"BRIDGE_PLUGINS__START_TIMEOUT": "-1"},
    ),
    ErrorCase(
        "misspelt env key names the variable",
        ("plugins.strat_timeout: unknown key", "BRIDGE_PLUGINS__STRAT_TIMEOUT"),
        env={"BRIDGE_PLUGINS__STRAT_TIMEOUT": "5"},
    ),
    ErrorCase(
        "env list that is not a list",
        ("plugins.allow_unsigned:", "(got 'a,b')", "BRIDGE_PLUGINS__ALLOW_UNSIGNED"),
        env={"BRIDGE_PLUGINS__ALLOW_UNSIGNED": "a,b"},
    ),
    ErrorCase(
        "env into a scalar",
        (
            "BRIDGE_SERVER__LISTEN__PORT",
            "server.listen.port cannot be set",
            "listen is not a section",
        ),
        "server: {listen: ':3100'}",
        env={"BRIDGE_SERVER__LISTEN__PORT": "1"},
    ),
    ErrorCase(
        "bad command-line value",
        ("server.listen: expected host:port", "(got 'nope')", "set by the command line"),
        overrides={"server.listen": "nope"},
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.name)
def test_errors(case: ErrorCase, tmp_path: Path) -> None:
    path = None if case.yaml is None else _write(tmp_path, case.yaml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=case.env, overrides=case.overrides)
    message = str(caught.value)
    for expected in case.expected:
        assert expected in message
    if path is not None and not case.env:
        assert str(path) in message
    # The message is the whole story: no chained pydantic or YAML exception to print.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_validation_errors_list_one_key_per_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "server: {listen: nope}\nplugins: {stop_grace: -1}")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value).splitlines() == [
        f"invalid config file {path}:",
        "  server.listen: expected host:port, e.g. 127.0.0.1:3100 or :3100 (got 'nope')",
        "  plugins.stop_grace: Input should be greater than or equal to 0 (got -1)",
    ]


@pytest.mark.parametrize(
    ("make_path", "expected"),
    [
        (lambda tmp: tmp / "missing.yaml", "No such file or directory"),
        (lambda tmp: tmp, "Is a directory"),
    ],
    ids=["missing", "directory"],
)
def test_unreadable_file(make_path: Callable[[Path], Path], expected: str, tmp_path: Path) -> None:
    path = make_path(tmp_path)
    with pytest.raises(ConfigError, match="cannot read config file") as caught:
        load_config(path, environ={})
    assert str(caught.value) == f"cannot read config file {path}: {expected}"


# -- host_config -----------------------------------------------------------------------------


def test_default_host_config_matches_the_plugin_host_defaults() -> None:
    host = BridgeConfig().host_config()
    assert host.supervisor == SupervisorOptions()
    assert host.grafana == GrafanaIdentity()
    assert host.grafana_root_url is None


def test_host_config_maps_every_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
plugins:
  directories: [/opt/plugins]
  allow_unsigned: [a]
  dev_mode: true
  public_keys: [/etc/keys/extra.asc]
  start_timeout: 11
  stop_grace: 0.5
  call_timeout: 12
  health_interval: 13
  health_timeout: 4
  health_failures: 6
  stats_interval: 7
  memory_limit_mb: 256
  restart:
    initial_backoff: 0.1
    max_backoff: 9
    multiplier: 3
    jitter: 0
    crash_loop_threshold: 2
    stable_after: 8
  forward_host_env: false
  disabled: [b]
  settings: {a: {url: "http://a"}}
  env: {a: {DEBUG: "1"}}
  attach: {c: "unix:/run/c.sock"}
grafana:
  version: "12.0.1"
  root_url: http://grafana:3000/
  feature_toggles: [x, y]
""",
    )
    host = load_config(path, environ={}).host_config()
    assert host.plugin_dirs == (Path("/opt/plugins"),)
    assert host.allow_unsigned == frozenset({"a"})
    assert host.dev_mode is True
    assert host.public_key_files == (Path("/etc/keys/extra.asc"),)
    assert host.grafana_root_url == "http://grafana:3000/"
    assert host.grafana == GrafanaIdentity(
        version="12.0.1", app_url="http://grafana:3000/", feature_toggles=("x", "y")
    )
    assert host.supervisor == SupervisorOptions(
        start_timeout=11,
        stop_grace=0.5,
        call_timeout=12,
        health_interval=13,
        health_timeout=4,
        health_failures=6,
        stats_interval=7,
        memory_limit_bytes=256 * 1024 * 1024,
        restart=RestartPolicy(
            initial_backoff=0.1,
            max_backoff=9,
            multiplier=3,
            jitter=0,
            crash_loop_threshold=2,
            stable_after=8,
        ),
    )
    assert host.forward_host_env is False
    assert host.disabled == frozenset({"b"})
    assert host.plugin_settings == {"a": {"url": "http://a"}}
    assert host.plugin_env == {"a": {"DEBUG": "1"}}
    assert host.attach == {"c": "unix:/run/c.sock"}


# -- the documented files --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _yaml_blocks(markdown: Path) -> list[str]:
    blocks: list[str] = []
    current: list[str] | None = None
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if current is None and line.strip() == "```yaml":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_yaml_example_in_the_configuration_docs_loads(tmp_path: Path) -> None:
    blocks = _yaml_blocks(ROOT / "docs" / "configuration.md")
    assert len(blocks) >= 2
    for index, block in enumerate(blocks):
        load_config(_write(tmp_path, block, f"example-{index}.yaml"), environ={})


def test_quickstart_example_loads_the_fixture_plugins() -> None:
    config = load_config(ROOT / "examples" / "quickstart.yaml", environ={})
    assert [d.resolve() for d in config.plugins.directories] == [ROOT / "fixtures" / "plugins"]
    assert config.plugins.allow_unsigned == {
        "bridge-gofixture-datasource",
        "bridge-pyfixture-datasource",
    }
    assert config.server.listen == "127.0.0.1:3100"
