"""The front door: owned requests go to plugin handlers, everything else to the delegate."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from bridge.apis import GROUP, RESOURCE, DataPlaneService
from bridge.apiserver import DataPlaneServiceAPI, api_group
from bridge.auth import authorize_namespace, build_authenticator, require_identity
from bridge.config import BridgeConfig
from bridge.context import Contexts
from bridge.controllers.autoregister import Candidate, auto_register, make_ledger
from bridge.controllers.availability import AvailabilityController, judge
from bridge.controllers.leader import make_elector
from bridge.controllers.registration import RegistrationController
from bridge.delegate import Delegate
from bridge.dsproxy import DatasourceProxy
from bridge.handlers.admission import handle_mutate, handle_validate
from bridge.handlers.base import Call, Deps, Handler
from bridge.handlers.conversion import handle_conversion
from bridge.handlers.health import handle_health
from bridge.handlers.proxy import handle_proxy
from bridge.handlers.query import handle_query
from bridge.handlers.resource import handle_resource
from bridge.handlers.stream import handle_stream
from bridge.identity import Identity, OrgRole, namespace_for_org
from bridge.limits import PluginConcurrency
from bridge.manifests import ManifestSet, ManifestWatcher
from bridge.metrics import BridgeMetrics
from bridge.plugin_context import default_grafana_config
from bridge.provisioning import ProvisioningStore
from bridge.routing import Endpoint, Match, MethodNotAllowed, PathError, RouteTable
from bridge.status import StatusError
from bridge.storage import StoreError
from bridge.storage.factory import make_store
from bridge.storage.sqlite import SQLiteStore
from bridge.streams import StreamHub
from plugin_host.errors import PluginError
from plugin_host.host import PluginHost

log = logging.getLogger(__name__)

# Not counted against limits.max_calls_per_plugin: streams are long-running (as watches are
# exempt from the Kubernetes API server's max-in-flight limit), and the datasource proxy never
# calls the plugin process (it has its own bounds: datasource_proxy.max_connections, timeout).
UNCOUNTED = frozenset({Endpoint.STREAM, Endpoint.PROXY})

# Available=False reasons that stop a request in front of the plugin with a 503, as
# kube-aggregator refuses requests to an APIService that is not available. HealthCheckFailed
# is left out on purpose: it is one missed go-plugin health ping, sampled every
# dataplane.availability_resync seconds, while the process is still running and may well
# answer; a plugin that keeps failing is restarted by its supervisor (then PluginNotRunning).
# The matched service holds its mount, so it is judged without the table's conflicts;
# Invalid objects are never mounted. The datasource
# proxy is not gated: it never calls the plugin process, and refuses by itself (503) when the
# plugin's plugin.json, which holds its routes, is not loaded.
_NO_CONFLICTS = RouteTable()
REFUSING_REASONS = frozenset({"PluginNotFound", "CrashLooping", "PluginNotRunning"})

HANDLERS: Mapping[Endpoint, Handler] = {
    Endpoint.QUERY: handle_query,
    Endpoint.HEALTH: handle_health,
    Endpoint.RESOURCE: handle_resource,
    Endpoint.ROUTE: handle_resource,
    Endpoint.STREAM: handle_stream,
    Endpoint.VALIDATE: handle_validate,
    Endpoint.MUTATE: handle_mutate,
    Endpoint.CONVERSION: handle_conversion,
    Endpoint.PROXY: handle_proxy,
}


class Bridge:
    """One bridge: plugins, route table, delegate, auth, provisioning, metrics.

    The route table is replaced whole (:meth:`set_services`); a request in flight keeps the
    table it resolved against.
    """

    def __init__(self, config: BridgeConfig, *, host_env: Mapping[str, str] | None = None) -> None:
        env = os.environ if host_env is None else host_env
        self.config = config
        self.host = PluginHost(config.host_config(), host_env=env)
        self.metrics = BridgeMetrics(self.host.registry.statuses)
        self.delegate = Delegate(config.delegate, observe=self.metrics.observe_delegated)
        self.provisioning = ProvisioningStore(config.provisioning, env=env)
        self.authenticator = build_authenticator(config.auth, fetch=self._fetch)
        self.routes = RouteTable()
        self.ready = {"plugins": False, "routes": False}
        self.store = make_store(config.storage)
        self.api = DataPlaneServiceAPI(self.store, self._identity)
        self._manifest_services: list[DataPlaneService] = []
        self._stored_services: list[DataPlaneService] = []
        self.registration = RegistrationController(self.store, apply=self._stored_changed)
        self.availability = AvailabilityController(
            self.store,
            objects=self.registration.objects,
            table=lambda: self.routes,
            plugins=self.host.registry.statuses,
            load_errors=self._load_errors,
            ping=self._ping,
            parsed=self.registration.parsed,
            resync=config.dataplane.availability_resync,
            leader=make_elector(
                self.store,
                lease_duration=config.dataplane.leader_lease_duration,
                retry_period=config.dataplane.leader_retry_period,
                registry=self.metrics.registry,
            ),
        )
        self.host.registry.add_listener(self.availability.poke)
        self.manifests = ManifestWatcher(
            config.dataplane.manifests,
            on_change=self._manifests_changed,
            interval=config.dataplane.reload_interval,
        )
        grafana = config.grafana_identity()
        contexts = Contexts(
            provisioning=self.provisioning,
            plugin_version=self._plugin_version,
            grafana=grafana,
            grafana_config=default_grafana_config(grafana),
        )
        self.streams = StreamHub(
            config.streams, client=self.host.registry.client, metrics=self.metrics
        )
        self.datasource_proxy = DatasourceProxy(
            config.datasource_proxy,
            datasources=lambda org_id, uid, plugin_id: self.provisioning.datasource(
                org_id, uid, plugin_id=plugin_id
            ),
            routes=self._plugin_routes,
            user_agent=f"Grafana/{config.grafana.version}",
            max_body_bytes=config.limits.max_body_bytes,
            registry=self.metrics.registry,
        )
        self.deps = Deps(
            client=self.host.registry.client,
            contexts=contexts,
            metrics=self.metrics,
            call_timeout=config.plugins.call_timeout,
            streams=self.streams,
            datasource_proxy=self.datasource_proxy,
            concurrency=PluginConcurrency(
                config.limits.max_calls_per_plugin,
                config.limits.calls_per_plugin,
                registry=self.metrics.registry,
            ),
        )
        self._tasks: list[asyncio.Task[None]] = []

    # -- route table -----------------------------------------------------------------------

    def set_services(self, services: list[DataPlaneService]) -> RouteTable:
        table = RouteTable.build(services)
        before = self.routes.conflicts
        for loser, winner in table.conflicts.items():
            if before.get(loser) == winner:
                continue  # already reported; its status says so too
            log.error(
                "DataPlaneService %s is not served: %s already claims its group and version",
                loser,
                winner,
            )
        self.routes = table
        self.metrics.route_table_services.set(len(table))
        self.metrics.route_table_swaps.inc()
        return table

    def _manifests_changed(self, manifests: ManifestSet) -> None:
        self._manifest_services = list(manifests.services)
        self.set_services(self._manifest_services + self._stored_services)
        # A manifest can win or give back a stored object's group/version: its Conflict
        # condition changes now, not at the next resync.
        self.availability.poke()

    def _stored_changed(self, services: list[DataPlaneService]) -> RouteTable:
        self._stored_services = services
        table = self.set_services(self._manifest_services + self._stored_services)
        self.availability.poke()
        return table

    async def _routes_ready(self) -> None:
        # Not awaited in start(): with etcd down the bridge still starts, just not ready.
        await self.registration.synced.wait()
        self.ready["routes"] = True

    async def _identity(self, request: web.Request) -> Identity:
        return await require_identity(self.authenticator, request)

    def _load_errors(self) -> dict[str, str]:
        return {e.plugin_id: e.reason for e in self.host.discovery.errors if e.plugin_id}

    async def _ping(self, plugin_id: str) -> bool:
        try:
            return await self.host.registry.client(plugin_id).ping(timeout=2.0)
        except PluginError:
            return False

    async def _auto_register(self) -> None:
        choice = self.config.dataplane.auto_register
        if choice == "none":
            return
        wanted = []
        for status in self.host.registry.statuses():
            spec = self.host.discovery.get(status.plugin_id)
            if spec is None or (choice != "all" and status.plugin_id not in choice):
                continue
            wanted.append(Candidate.of(spec.plugin_json, status.services))
        ledger = make_ledger(self.config.storage)
        try:
            await auto_register(self.store, wanted, ledger=ledger)
        except StoreError as exc:
            log.warning("auto-registration skipped: storage unavailable (%s)", exc.message)
        finally:
            await ledger.close()

    def _plugin_routes(self, plugin_id: str) -> tuple[Mapping[str, Any], ...] | None:
        spec = self.host.discovery.get(plugin_id)
        return spec.plugin_json.routes if spec is not None else None

    def _plugin_version(self, plugin_id: str) -> str:
        spec = self.host.discovery.get(plugin_id)
        return (spec.version or "") if spec is not None else ""

    async def _fetch(self, path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        return await self.delegate.fetch_json(
            path, headers=headers, timeout=self.config.auth.timeout
        )

    # -- requests --------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Resolve once, on the raw path; authorise and handle on that same resolution."""
        try:
            resolved = self.routes.resolve(request.method, request.rel_url.raw_path)
        except PathError as exc:
            raise StatusError(400, f"invalid request path: {exc}") from None
        if resolved is None:
            return await self.delegate.proxy(request)
        if isinstance(resolved, MethodNotAllowed):
            allowed = ", ".join(sorted(resolved.allowed))
            raise StatusError(
                405,
                f"method {request.method} is not allowed here; use {allowed}",
                headers=(("Allow", allowed),),
            )
        handler = HANDLERS.get(resolved.endpoint)
        if handler is None:
            # Service types this bridge does not serve yet fall through, as upstream's do.
            return await self.delegate.proxy(request)
        call = await self._authorize(request, resolved)
        self._refuse_if_unavailable(resolved)
        if resolved.endpoint in UNCOUNTED:
            return await handler(call, self.deps)
        with self.deps.concurrency.slot(call.plugin_id):
            return await handler(call, self.deps)

    def _refuse_if_unavailable(self, match: Match) -> None:
        """503 when the service's plugin cannot take calls, for the Available condition's reason.

        The verdict comes from :func:`judge` on the registry's state right now (not from the
        stored condition, which lags and which manifest-loaded services do not have).
        """
        if match.endpoint is Endpoint.PROXY:
            return
        service = match.service
        registry = self.host.registry
        status = registry.status(service.plugin_id) if service.plugin_id in registry else None
        verdict = judge(
            {"metadata": {"name": service.name}},
            # The matched service holds its mount, whatever else claimed the group/version.
            table=_NO_CONFLICTS,
            plugins={} if status is None else {service.plugin_id: status},
            load_errors=self._load_errors() if status is None else {},
            healthy={},
            parsed=service,
        )
        if verdict.status == "True" or verdict.reason not in REFUSING_REASONS:
            return
        if status is None:
            retry_after = self.config.dataplane.availability_resync
        elif status.next_start_at is not None:
            retry_after = max(1.0, status.next_start_at - time.time())
        else:
            retry_after = 1.0
        # The stable part of the condition only: the full text (last error, stderr line,
        # socket path) is in the object's status and the log, not in answers to any caller.
        raise StatusError(
            503,
            f"{service.name} is not available ({verdict.reason}): {verdict.message}",
            retry_after=retry_after,
            details={
                "name": service.name,
                "group": GROUP,
                "kind": RESOURCE,
                "causes": [{"reason": verdict.reason, "message": verdict.message}],
            },
        )

    async def _authorize(self, request: web.Request, match: Match) -> Call:
        identity = await require_identity(self.authenticator, request)
        namespace = match.params.get("namespace")
        if namespace is not None:
            org_id = authorize_namespace(identity, namespace)
        else:
            org_id = identity.org_id
            namespace = namespace_for_org(org_id)
        if identity.role.rank < OrgRole.VIEWER.rank:
            raise StatusError(403, f"user {identity.login!r} has no role in org {org_id}")
        return Call(
            request=request, match=match, identity=identity, org_id=org_id, namespace=namespace
        )

    async def api_groups(self, request: web.Request) -> web.StreamResponse:
        """``/apis``: the bridge's own API groups first, then the delegate's.

        Only for signed-in callers, as Kubernetes' discovery (the delegate checks again).
        """
        await require_identity(self.authenticator, request)
        document = await self.delegate.merged_api_groups(self.own_api_groups(), request.headers)
        return web.json_response(document)

    def own_api_groups(self) -> list[dict[str, Any]]:
        # DataPlaneService groups are not listed, as upstream: their resources live elsewhere.
        return [api_group()]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; on failure (or cancellation) whatever started is stopped again."""
        try:
            await self.delegate.start()
            await self.datasource_proxy.start()
            if isinstance(self.store, SQLiteStore):
                await self.store.open()  # a bad database file stops start-up here
            await self.manifests.load()
            self.manifests.start()
            self.registration.start()
            self._tasks.append(asyncio.create_task(self.provisioning.watch(), name="provisioning"))
            await self.host.load()
            await self.host.start(wait=self.config.plugins.start_timeout + 5)
            self.ready["plugins"] = True
            await self._auto_register()
            self.availability.start()
            self._tasks.append(asyncio.create_task(self._routes_ready(), name="routes-ready"))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.streams.close()  # subscribers get 1001; every RunStream is cancelled
        await self.availability.stop()
        await self.registration.stop()
        await self.manifests.stop()
        await self.host.stop()
        await self.delegate.close()
        await self.datasource_proxy.close()
        await self.store.close()
