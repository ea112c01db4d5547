"""The set of supervised plugins: start them together, stop them together, hand out clients."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from plugin_host.client import BackendClient
from plugin_host.errors import PluginNotFound
from plugin_host.process import make_socket_root
from plugin_host.supervisor import (
    PluginStatus,
    PluginSupervisor,
    PluginTarget,
    StatusListener,
    SupervisorOptions,
)

log = logging.getLogger(__name__)


class PluginRegistry:
    """Owns every plugin supervisor; the only way the rest of the program reaches a plugin.

    Without a ``socket_root`` the registry makes its own private directory for plugin
    sockets when a plugin first starts (clearing away those of hosts that died), and
    removes it in :meth:`stop`.
    """

    def __init__(
        self, *, options: SupervisorOptions | None = None, socket_root: Path | None = None
    ) -> None:
        self.options = options or SupervisorOptions()
        self._own_socket_root = socket_root is None
        self._socket_root = socket_root
        self._supervisors: dict[str, PluginSupervisor] = {}
        self._listeners: list[StatusListener] = []

    @property
    def socket_root(self) -> Path | None:
        """Where plugin sockets live (None until a plugin of a self-managed root starts)."""
        return self._socket_root

    def _ensure_socket_root(self) -> Path:
        root = self._socket_root
        if root is None:
            root = self._socket_root = make_socket_root()
        elif not root.is_dir():
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return root

    def add(
        self, target: PluginTarget, *, options: SupervisorOptions | None = None
    ) -> PluginSupervisor:
        if target.plugin_id in self._supervisors:
            raise ValueError(f"plugin {target.plugin_id} is already registered")
        supervisor = PluginSupervisor(
            target, options=options or self.options, socket_root=self._ensure_socket_root
        )
        for listener in self._listeners:
            supervisor.add_listener(listener)
        self._supervisors[target.plugin_id] = supervisor
        return supervisor

    def add_listener(self, listener: StatusListener) -> None:
        """Called with a fresh :class:`PluginStatus` on every change of any plugin."""
        self._listeners.append(listener)
        for supervisor in self._supervisors.values():
            supervisor.add_listener(listener)

    def __contains__(self, plugin_id: object) -> bool:
        return plugin_id in self._supervisors

    def plugin_ids(self) -> list[str]:
        return sorted(self._supervisors)

    def supervisor(self, plugin_id: str) -> PluginSupervisor:
        try:
            return self._supervisors[plugin_id]
        except KeyError:
            raise PluginNotFound(plugin_id) from None

    def client(self, plugin_id: str) -> BackendClient:
        """The plugin's client; fails fast with PluginNotFound or PluginUnavailable."""
        return self.supervisor(plugin_id).client()

    def status(self, plugin_id: str) -> PluginStatus:
        return self.supervisor(plugin_id).status

    def statuses(self) -> list[PluginStatus]:
        return [self._supervisors[p].status for p in sorted(self._supervisors)]

    async def start(
        self, plugin_ids: Iterable[str] | None = None, *, wait: float | None = None
    ) -> list[PluginStatus]:
        """Start supervising; with ``wait``, return once each first start has settled."""
        chosen = [
            self.supervisor(p)
            for p in (plugin_ids if plugin_ids is not None else self.plugin_ids())
        ]
        for supervisor in chosen:
            await supervisor.start()
        if wait is None:
            return [s.status for s in chosen]
        return list(await asyncio.gather(*(s.wait_settled(wait) for s in chosen)))

    async def stop(self) -> None:
        """Stop every plugin in parallel; nothing is left running afterwards."""
        supervisors = list(self._supervisors.values())
        results = await asyncio.gather(*(s.stop() for s in supervisors), return_exceptions=True)
        for supervisor, result in zip(supervisors, results, strict=True):
            if isinstance(result, BaseException):
                log.error("stopping plugin %s failed: %r", supervisor.plugin_id, result)
        if self._own_socket_root and self._socket_root is not None:
            shutil.rmtree(self._socket_root, ignore_errors=True)
            # A later start makes a fresh private root rather than reuse a removed path.
            self._socket_root = None

    async def remove(self, plugin_id: str) -> None:
        supervisor = self._supervisors.pop(plugin_id, None)
        if supervisor is not None:
            await supervisor.stop()

    async def __aenter__(self) -> PluginRegistry:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
