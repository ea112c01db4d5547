"""The bridge's configuration: one typed object from a YAML file plus environment overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.auth import AuthSettings
from bridge.delegate import DelegateSettings
from bridge.dsproxy.settings import DatasourceProxySettings
from bridge.provisioning import ProvisioningSettings
from bridge.storage.factory import StorageSettings
from plugin_host.handshake import GrafanaIdentity
from plugin_host.host import HostConfig
from plugin_host.process import resolve_run_as
from plugin_host.supervisor import RestartPolicy, SupervisorOptions

ENV_PREFIX = "BRIDGE_"
ENV_NESTING = "__"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and what is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    listen: str = "127.0.0.1:3100"
    shutdown_grace: float = Field(default=10.0, ge=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Client certificates signed by this CA authenticate (CN = login, O = groups); bridge/tls.py.
    client_ca: Path | None = None
    client_auth: Literal["optional", "required"] = "optional"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected host:port, e.g. 127.0.0.1:3100 or :3100")
        return value

    @property
    def host(self) -> str:
        host = self.listen.rpartition(":")[0].strip("[]")
        return host or "0.0.0.0"  # noqa: S104 - ":port" means all interfaces, as in Grafana

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class RestartSettings(_Section):
    initial_backoff: float = Field(default=1.0, gt=0)
    max_backoff: float = Field(default=300.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, lt=1)
    crash_loop_threshold: int = Field(default=5, ge=1)
    stable_after: float = Field(default=30.0, ge=0)


class PluginsSettings(_Section):
    directories: tuple[Path, ...] = (Path("data/plugins"),)
    allow_unsigned: frozenset[str] = frozenset()
    dev_mode: bool = False
    public_keys: tuple[Path, ...] = ()
    start_timeout: float = Field(default=60.0, gt=0)
    stop_grace: float = Field(default=2.0, ge=0)
    call_timeout: float = Field(default=30.0, gt=0)
    health_interval: float = Field(default=10.0, gt=0)
    health_timeout: float = Field(default=5.0, gt=0)
    health_failures: int = Field(default=3, ge=1)
    stats_interval: float = Field(default=5.0, gt=0)
    memory_limit_mb: int | None = Field(default=None, gt=0)
    # The largest gRPC message a plugin may send (or be sent), in MiB; per plugin id below.
    max_message_mb: int = Field(default=256, ge=1, le=2047)
    message_mb_per_plugin: dict[str, int] = Field(default_factory=dict)
    restart: RestartSettings = RestartSettings()
    forward_host_env: bool = True
    disabled: frozenset[str] = frozenset()
    settings: dict[str, dict[str, str]] = Field(default_factory=dict)
    env: dict[str, dict[str, str]] = Field(default_factory=dict)
    attach: dict[str, str] = Field(default_factory=dict)
    # docs/security.md: refuse binaries in group/world-writable or foreign-owned directories.
    strict_permissions: bool = True
    # Run plugin processes as this user (the bridge must run as root); see plugin_host/process.py.
    run_as_user: str | None = None

    @field_validator("run_as_user")
    @classmethod
    def _run_as(cls, value: str | None) -> str | None:
        if value is not None:
            resolve_run_as(value)  # a clear error now, not at the first plugin start
        return value

    @field_validator("message_mb_per_plugin")
    @classmethod
    def _message_limits(cls, value: dict[str, int]) -> dict[str, int]:
        for plugin_id, mb in value.items():
            if not 1 <= mb <= 2047:
                raise ValueError(f"{plugin_id}: expected 1 … 2047 (MiB), got {mb}")
        return value


class GrafanaSettings(_Section):
    version: str = "11.3.0"
    root_url: str = ""
    feature_toggles: tuple[str, ...] = ()


class DataPlaneSettings(_Section):
    """Where DataPlaneServices come from until they are served by the bridge's own API."""

    manifests: tuple[Path, ...] = ()
    reload_interval: float = Field(default=2.0, gt=0)
    # A DataPlaneService per backend plugin at start-up: "all", "none", or a list of plugin ids.
    auto_register: Literal["all", "none"] | tuple[str, ...] = "all"
    # How often the availability controller re-checks plugins when nothing else changed.
    availability_resync: float = Field(default=10.0, gt=0)
    # Replicas sharing etcd elect one status writer (bridge/controllers/leader.py): the etcd
    # lease's time to live, and how often the leader renews it and followers try to take it.
    leader_lease_duration: float = Field(default=15.0, ge=2)
    leader_retry_period: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _renew_inside_the_lease(self) -> DataPlaneSettings:
        if self.leader_retry_period * 3 > self.leader_lease_duration:
            raise ValueError(
                "leader_retry_period must be at most a third of leader_lease_duration "
                "(the lease is renewed several times before it could expire)"
            )
        return self


class LimitsSettings(_Section):
    # The SDK's gRPC server refuses messages over 16 MiB, so a larger body could never arrive.
    max_body_bytes: int = Field(default=16 * 2**20, gt=0)
    # bridge/limits.py: 414/431 Status beyond these; aiohttp's parser stops at twice them.
    max_url_bytes: int = Field(default=8192, ge=256)
    max_header_bytes: int = Field(default=8190, ge=256)
    max_headers: int = Field(default=128, ge=16)
    # Calls in flight per plugin (streams excepted); beyond: 429 + Retry-After, never a queue.
    max_calls_per_plugin: int = Field(default=100, ge=1)
    calls_per_plugin: dict[str, int] = Field(default_factory=dict)

    @field_validator("calls_per_plugin")
    @classmethod
    def _per_plugin_calls(cls, value: dict[str, int]) -> dict[str, int]:
        # 0 would refuse every call to the plugin with a 429 forever: say so now instead.
        for plugin_id, calls in value.items():
            if calls < 1:
                raise ValueError(f"{plugin_id}: expected at least 1 call in flight, got {calls}")
        return value


class StreamsSettings(_Section):
    """Grafana Live streams (docs/streams.md)."""

    # Messages waiting for one subscriber; past it, `overflow` decides.
    buffer_size: int = Field(default=256, ge=1)
    # "drop_oldest": the subscriber loses its oldest waiting message; "disconnect": it is closed.
    overflow: Literal["drop_oldest", "disconnect"] = "drop_oldest"
    max_subscribers: int = Field(default=1000, ge=1)
    # Channels (each one RunStream) open at once for one plugin, across orgs and datasources;
    # a subscriber that would open one more is refused (429 / WebSocket close 1013).
    max_channels_per_plugin: int = Field(default=100, ge=1)
    # Largest message a client may send (WebSocket message, POST body or ?data=).
    max_message_bytes: int = Field(default=65536, gt=0)
    # Seconds between SSE heartbeat comments on an idle stream.
    heartbeat: float = Field(default=15.0, gt=0)
    # Seconds one SSE write may wait for a client that stopped reading; past it the
    # subscription ends and the connection is aborted.
    write_timeout: float = Field(default=30.0, gt=0)
    # Seconds between WebSocket pings; a client whose pong is not back within half of it is
    # disconnected. None: no pings.
    ws_ping: float | None = Field(default=25.0, gt=0)
    restart_backoff: float = Field(default=0.5, gt=0)
    restart_max_backoff: float = Field(default=10.0, gt=0)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class BridgeConfig(_Section):
    """The whole configuration. Every key is documented in docs/configuration.md."""

    server: ServerSettings = ServerSettings()
    plugins: PluginsSettings = PluginsSettings()
    grafana: GrafanaSettings = GrafanaSettings()
    delegate: DelegateSettings = DelegateSettings()
    auth: AuthSettings = AuthSettings()
    provisioning: ProvisioningSettings = ProvisioningSettings()
    dataplane: DataPlaneSettings = DataPlaneSettings()
    storage: StorageSettings = StorageSettings()
    limits: LimitsSettings = LimitsSettings()
    datasource_proxy: DatasourceProxySettings = DatasourceProxySettings()
    streams: StreamsSettings = StreamsSettings()
    logging: LoggingSettings = LoggingSettings()

    def grafana_identity(self) -> GrafanaIdentity:
        return GrafanaIdentity(
            version=self.grafana.version,
            app_url=self.grafana.root_url,
            feature_toggles=self.grafana.feature_toggles,
        )

    def host_config(self) -> HostConfig:
        p = self.plugins
        return HostConfig(
            plugin_dirs=p.directories,
            allow_unsigned=p.allow_unsigned,
            dev_mode=p.dev_mode,
            public_key_files=p.public_keys,
            grafana_root_url=self.grafana.root_url or None,
            grafana=self.grafana_identity(),
            supervisor=SupervisorOptions(
                start_timeout=p.start_timeout,
                stop_grace=p.stop_grace,
                call_timeout=p.call_timeout,
                health_interval=p.health_interval,
                health_timeout=p.health_timeout,
                health_failures=p.health_failures,
                stats_interval=p.stats_interval,
                memory_limit_bytes=p.memory_limit_mb * 2**20 if p.memory_limit_mb else None,
                restart=RestartPolicy(**p.restart.model_dump()),
                run_as=resolve_run_as(p.run_as_user) if p.run_as_user else None,
                max_message_bytes=p.max_message_mb * 2**20,
            ),
            message_limits={k: v * 2**20 for k, v in p.message_mb_per_plugin.items()},
            plugin_settings=p.settings,
            plugin_env=p.env,
            attach=p.attach,
            forward_host_env=p.forward_host_env,
            disabled=p.disabled,
            strict_permissions=p.strict_permissions,
        )


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BridgeConfig:
    """Read the YAML file (if any), apply ``BRIDGE_*`` variables, then ``overrides``.

    Relative paths in the file are taken relative to the file's directory.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(path)
        _resolve_paths(data, path.parent)
    # Where each value not from the file came from, so an error can name what to fix.
    sources: dict[tuple[str, ...], str] = {}
    env = os.environ if environ is None else environ
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            parts = _env_path(name)
            _set_path(data, parts, _env_value(value), source=name)
            sources[tuple(parts)] = f"environment variable {name}"
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        _set_path(data, parts, value, source=f"--{dotted}")
        sources[tuple(parts)] = "the command line"
    try:
        return BridgeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return loaded


# Keys holding file system paths, resolved against the config file's directory.
_PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("plugins", "directories"),
    ("plugins", "public_keys"),
    ("server", "tls_cert"),
    ("server", "tls_key"),
    ("server", "client_ca"),
    ("provisioning", "directories"),
    ("dataplane", "manifests"),
    ("auth", "token_file"),
    ("delegate", "ca_file"),
    ("storage", "sqlite_path"),
)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for section_name, key in _PATH_KEYS:
        section = data.get(section_name)
        if not isinstance(section, dict):
            continue
        value = section.get(key)
        if isinstance(value, str):
            section[key] = str(base / value)
        elif isinstance(value, list):
            section[key] = [str(base / v) if isinstance(v, str) else v for v in value]


def _env_path(name: str) -> list[str]:
    """``BRIDGE_PLUGINS__START_TIMEOUT`` → ``["plugins", "start_timeout"]``."""
    return [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTING)]


def _env_value(value: str) -> Any:
    """A YAML flow collection (``[a, b]``, ``{k: v}``), ``null``/``~`` for unset, or a string.

    Other scalars stay strings and validation converts them to the key's type, so a version
    such as ``11.10`` is never read as the number 11.1.
    """
    text = value.strip()
    if text in ("null", "~"):
        return None
    if text.startswith(("[", "{")):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, list | dict):
            return parsed
    return value


def _set_path(data: dict[str, Any], parts: list[str], value: Any, *, source: str) -> None:
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts)} cannot be set, {part} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(
    exc: ValidationError, path: Path | None, sources: Mapping[tuple[str, ...], str]
) -> str:
    where = f"config file {path}" if path else "configuration"
    lines = [f"invalid {where}:"]
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        key = ".".join(loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/configuration.md)"
        else:
            message += f" (got {error.get('input')!r})"
        origin = next((sources[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in sources), "")
        if origin:
            message += f", set by {origin}"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
