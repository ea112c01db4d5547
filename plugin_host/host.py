"""The plugin host as a whole: discover plugins, supervise the backend ones, stop them all."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from plugin_host.discovery import DiscoveryResult, PluginSpec, discover_async
from plugin_host.handshake import GrafanaIdentity, build_environment
from plugin_host.keyring import KeyRing
from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginStatus, PluginTarget, SupervisorOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    """Everything the plugin host needs to know; built once by the bridge's config loader."""

    plugin_dirs: tuple[Path, ...] = ()
    allow_unsigned: frozenset[str] = frozenset()
    dev_mode: bool = False
    public_key_files: tuple[Path, ...] = ()
    grafana_root_url: str | None = None
    grafana: GrafanaIdentity = field(default_factory=GrafanaIdentity)
    supervisor: SupervisorOptions = field(default_factory=SupervisorOptions)
    # Per plugin id: a `[plugin.<id>]`-style section, passed on as GF_PLUGIN_<KEY>. Settings
    # and env often hold secrets (API keys): both are kept out of the repr.
    plugin_settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)
    # Per plugin id: extra environment variables, set as they are.
    plugin_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)
    # Per plugin id: the address of a plugin someone else runs (standalone/debug mode).
    attach: Mapping[str, str] = field(default_factory=dict)
    forward_host_env: bool = True
    disabled: frozenset[str] = frozenset()
    strict_permissions: bool = True  # plugins.strict_permissions (docs/security.md)
    # Per plugin id: the largest gRPC message, overriding supervisor.max_message_bytes.
    message_limits: Mapping[str, int] = field(default_factory=dict)


class PluginHost:
    """Finds plugins, starts the backend ones under supervision, and owns their registry."""

    def __init__(self, config: HostConfig, *, host_env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self._host_env = dict(os.environ if host_env is None else host_env)
        self.registry = PluginRegistry(options=config.supervisor)
        self.discovery = DiscoveryResult(plugins=(), errors=())
        self._loaded = False

    async def load(self) -> DiscoveryResult:
        """Discover plugins and register a supervisor for every backend plugin that may run.

        Runs once: later calls (``async with`` after an explicit ``load()``) return the
        first result.
        """
        if self._loaded:
            return self.discovery
        self._loaded = True
        try:
            keyring = KeyRing.load(self.config.public_key_files)
            self.discovery = await discover_async(
                self.config.plugin_dirs,
                keyring=keyring,
                allow_unsigned=self.config.allow_unsigned,
                dev_mode=self.config.dev_mode,
                grafana_root_url=self.config.grafana_root_url,
                strict_permissions=self.config.strict_permissions,
            )
        except BaseException:
            self._loaded = False  # nothing was registered: a later call may try again
            raise
        for warning in self.discovery.warnings:
            log.warning("%s", warning)
        for error in self.discovery.errors:
            log.error("not loading %s", error)
        for spec in self.discovery.plugins:
            if spec.id in self.config.disabled:
                log.info("plugin %s is disabled in the configuration", spec.id)
                continue
            target = self._target(spec)
            if target is not None:
                self.registry.add(target)
        for plugin_id, address in self.config.attach.items():
            if plugin_id in self.config.disabled:
                log.info("plugin %s is disabled in the configuration", plugin_id)
            elif plugin_id not in self.registry:
                self.registry.add(
                    PluginTarget(
                        plugin_id=plugin_id,
                        attach_address=address,
                        max_message_bytes=self.config.message_limits.get(plugin_id),
                    )
                )
        return self.discovery

    def _target(self, spec: PluginSpec) -> PluginTarget | None:
        attach = self.config.attach.get(spec.id)
        if attach is not None:
            return PluginTarget(
                plugin_id=spec.id,
                plugin_version=spec.version or "",
                attach_address=attach,
                max_message_bytes=self.config.message_limits.get(spec.id),
            )
        if spec.executable is None:
            return None
        env = build_environment(
            host_env=self._host_env,
            grafana=self.config.grafana,
            plugin_version=spec.version or "",
            plugin_settings=self.config.plugin_settings.get(spec.id),
            extra_env=self.config.plugin_env.get(spec.id),
            forward_host_env=self.config.forward_host_env,
        )
        return PluginTarget(
            plugin_id=spec.id,
            plugin_version=spec.version or "",
            executable=spec.executable,
            env=env,
            executable_sha256=spec.executable_sha256,
            max_message_bytes=self.config.message_limits.get(spec.id),
        )

    async def start(self, *, wait: float | None = None) -> list[PluginStatus]:
        return await self.registry.start(wait=wait)

    async def stop(self) -> None:
        await self.registry.stop()

    async def __aenter__(self) -> PluginHost:
        await self.load()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
