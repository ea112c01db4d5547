"""Auto-registration: a DataPlaneService for each backend plugin, derived from what it serves.

Upstream, Grafana creates the objects for app manifests at start-up. Here each running plugin
gets ``v0alpha1.<plugin id>.grafana.app`` with one service per thing it serves (see
:func:`service_types`). An object the bridge created carries annotations; one a user created,
or changed since, is never overwritten.

A user's delete is a change too, and it sticks. The bridge keeps a ledger, one record per
derived name it has seen an object under (its own or a user's), in a second resource of the
same storage (``autoregistrations``: the same SQLite file, or keys nested under the etcd
prefix, so replicas share it and the bridge's etcd role needs only that prefix). At
start-up an object that is missing although the ledger says it existed was deleted by a
user: it is not created again, and its record is marked ``Declined``. To hand the object
back, create it again with the annotation ``bridge.grafana.app/managed-by: auto-registration``
and no spec hash; the next start-up adopts it and keeps it up to date again.

The record is read before the object and written after it, so a replica that finds a record
knows the object existed; a bridge that dies between the two writes finds its own object at
the next start and writes the record then (which is also how objects registered before the
ledger existed get one).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.apis import API_VERSION, KIND, PluginType, ServiceType
from bridge.storage import AlreadyExists, Conflict, NotFound, StorageSettings, Store
from bridge.storage.etcd import PermissionDenied
from bridge.storage.factory import make_store, nested_prefix
from plugin_host.plugin_json import PluginJSON

log = logging.getLogger(__name__)

MANAGED_BY = "bridge.grafana.app/managed-by"
SPEC_HASH = "bridge.grafana.app/spec-hash"
MANAGER = "auto-registration"
VERSION = "v0alpha1"

# The ledger: its resource name (SQLite) and the kind and states of its records.
LEDGER_RESOURCE = "autoregistrations"
LEDGER_API_VERSION = "bridge.grafana.app/v1"
LEDGER_KIND = "AutoRegistration"
PRESENT = "Present"
DECLINED = "Declined"
_LEDGER_HISTORY = 100

# pluginv2 service → DataPlaneService service type, in the order they are listed.
_SERVICE_TYPES = (
    ("pluginv2.Data", ServiceType.QUERY),
    ("pluginv2.Resource", ServiceType.ROUTE),
    ("pluginv2.Stream", ServiceType.STREAM),
    ("pluginv2.AdmissionControl", ServiceType.ADMISSION),
    ("pluginv2.ResourceConversion", ServiceType.CONVERSION),
)
_NOT_DNS = re.compile(r"[^a-z0-9.-]+")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A plugin auto-registration may register, and what is known about what it serves."""

    plugin_id: str
    plugin_type: str
    # The pluginv2 services it registered, from gRPC reflection; None when it has none.
    served: frozenset[str] | None = None
    streaming: bool = False  # plugin.json "streaming"
    routes: bool = False  # plugin.json has "routes" (data source proxy routes)

    @classmethod
    def of(cls, plugin_json: PluginJSON, served: frozenset[str] | None) -> Candidate:
        return cls(
            plugin_id=plugin_json.id,
            plugin_type=plugin_json.type,
            served=served,
            streaming=plugin_json.streaming,
            routes=bool(plugin_json.routes),
        )


def group_for(plugin_id: str) -> str:
    label = _NOT_DNS.sub("-", plugin_id.lower()).strip("-.") or "plugin"
    return f"{label}.grafana.app"


def service_types(candidate: Candidate) -> list[ServiceType]:
    """The service types a plugin gets, as Grafana would call it.

    With gRPC reflection the plugin's own list of pluginv2 services decides. Without it (the
    Go SDK registers no reflection service) Grafana's rule for a ``backend: true`` plugin
    applies: it sends QueryData and CallResource to any backend plugin, so ``query`` and
    ``route``; and RunStream only to one whose plugin.json says ``"streaming": true``, so
    ``stream`` then. Admission and conversion are never assumed (nothing in plugin.json
    announces them). A data source whose plugin.json has ``routes`` also gets
    ``datasource-proxy``: those routes exist for Grafana's data proxy, which works from
    plugin.json and the data source's settings, not from the plugin process.
    """
    served = candidate.served
    if served is None:
        served = frozenset({"pluginv2.Data", "pluginv2.Resource"})
        if candidate.streaming:
            served |= {"pluginv2.Stream"}
    types = [kind for name, kind in _SERVICE_TYPES if name in served]
    if candidate.routes and candidate.plugin_type == PluginType.DATASOURCE:
        types.append(ServiceType.DATASOURCE_PROXY)
    return types


def derived_object(
    plugin_id: str | Candidate,
    plugin_type: str = "datasource",
    served: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The DataPlaneService a plugin gets (a :class:`Candidate`, or its first three fields)."""
    candidate = (
        plugin_id
        if isinstance(plugin_id, Candidate)
        else Candidate(plugin_id=plugin_id, plugin_type=plugin_type, served=served)
    )
    group = group_for(candidate.plugin_id)
    spec = {
        "pluginID": candidate.plugin_id,
        "pluginType": str(
            PluginType.APP if candidate.plugin_type == "app" else PluginType.DATASOURCE
        ),
        "group": group,
        "version": VERSION,
        "services": [{"type": str(kind)} for kind in service_types(candidate)],
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": f"{VERSION}.{group}",
            "labels": {"app.kubernetes.io/managed-by": "grafana-bridge"},
            "annotations": {MANAGED_BY: MANAGER, SPEC_HASH: spec_hash(spec)},
        },
        "spec": spec,
    }


def spec_hash(spec: Any) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# -- the ledger --------------------------------------------------------------------------------


def ledger_prefix(prefix: str) -> str:
    """The etcd prefix of the ledger: ``<prefix>autoregistrations/`` (see
    :func:`~bridge.storage.factory.nested_prefix`)."""
    return nested_prefix(prefix, LEDGER_RESOURCE)


def make_ledger(settings: StorageSettings) -> Store:
    """The ledger store for the configured storage, not yet opened; the caller closes it."""
    return make_store(settings, resource=LEDGER_RESOURCE, history=_LEDGER_HISTORY)


def _record(name: str, plugin_id: str, state: str) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": LEDGER_API_VERSION,
        "kind": LEDGER_KIND,
        "metadata": {"name": name},
        "spec": {"pluginID": plugin_id, "state": state, "since": now},
    }


async def _get(store: Store, name: str) -> dict[str, Any] | None:
    try:
        return await store.get(name)
    except NotFound:
        return None


async def _note(
    ledger: Store, name: str, plugin_id: str, record: dict[str, Any] | None, state: str
) -> None:
    """Make the record of ``name`` say ``state``; a concurrent writer's record is left be."""
    if record is None:
        with contextlib.suppress(AlreadyExists):  # another replica wrote it
            await ledger.create(_record(name, plugin_id, state))
        return
    if record.get("spec", {}).get("state") == state:
        return
    updated = copy.deepcopy(record)
    updated["spec"] = _record(name, plugin_id, state)["spec"]
    with contextlib.suppress(Conflict, NotFound):
        await ledger.update(updated, expected_version=int(record["metadata"]["resourceVersion"]))


async def declined(ledger: Store) -> list[str]:
    """Names of the objects users deleted and auto-registration therefore leaves deleted."""
    records, _ = await ledger.list()
    return [r["metadata"]["name"] for r in records if r.get("spec", {}).get("state") == DECLINED]


# -- registering -------------------------------------------------------------------------------


async def auto_register(
    store: Store,
    plugins: Iterable[Candidate | tuple[str, str, frozenset[str] | None]],
    *,
    ledger: Store | None = None,
) -> list[str]:
    """Create or refresh the derived object of each plugin; returns the names written.

    An existing object is refreshed only while it is still exactly what the bridge wrote (its
    spec hashes to its annotation); otherwise a user owns it. With a ``ledger``, a name an
    object was seen under once, and that a user deleted since, is not created again.
    """
    written: list[str] = []
    for plugin in plugins:
        candidate = plugin if isinstance(plugin, Candidate) else Candidate(*plugin)
        try:
            registered = await _register(store, ledger, candidate)
        except PermissionDenied as exc:
            # Not an outage: retrying will not help, the operator must grant the key range.
            log.error(
                "auto-registration stopped: etcd denies the bridge access to %s (%s)",
                exc.key_range,
                exc.message,
            )
            return written
        if registered:
            written.append(derived_object(candidate)["metadata"]["name"])
    return written


async def _register(store: Store, ledger: Store | None, candidate: Candidate) -> bool:
    wanted = derived_object(candidate)
    name = wanted["metadata"]["name"]
    plugin_id = candidate.plugin_id
    # The record first: one found means the object existed before this read of it.
    record = await _get(ledger, name) if ledger is not None else None
    current = await _get(store, name)
    if current is None:
        if ledger is not None and record is not None:
            first_time = record.get("spec", {}).get("state") != DECLINED
            await _note(ledger, name, plugin_id, record, DECLINED)
            # Loud the first time: a delete that was not a user's (a cleared prefix, a restore
            # from an older snapshot) looks the same, and from now on it is never undone.
            log.log(
                logging.WARNING if first_time else logging.INFO,
                "not registering DataPlaneService %s for plugin %s: it was deleted after the "
                "bridge registered it, so a user declined it (create it again to serve it)",
                name,
                plugin_id,
            )
            return False
        try:
            await store.create(wanted)
        except AlreadyExists:
            return False  # another replica was quicker
        if ledger is not None:
            await _note(ledger, name, plugin_id, record, PRESENT)
        log.info("registered DataPlaneService %s for plugin %s", name, plugin_id)
        return True
    if ledger is not None:  # whoever made it: if it goes away, a user removed it
        await _note(ledger, name, plugin_id, record, PRESENT)
    annotations = current.get("metadata", {}).get("annotations") or {}
    if annotations.get(MANAGED_BY) != MANAGER:
        return False  # created by a user
    written_hash = annotations.get(SPEC_HASH)
    if written_hash is not None and written_hash != spec_hash(current.get("spec")):
        log.info("DataPlaneService %s was changed by a user; auto-registration leaves it", name)
        return False
    if written_hash is not None and current.get("spec") == wanted["spec"]:
        return False
    # Out of date, or handed back by a user (the managed-by annotation without a hash).
    updated = copy.deepcopy(current)
    updated["spec"] = wanted["spec"]
    updated["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec_hash(wanted["spec"])
    try:
        await store.update(updated, expected_version=int(current["metadata"]["resourceVersion"]))
    except (Conflict, NotFound):
        return False  # changed meanwhile: whoever wrote it owns it now
    log.info("updated DataPlaneService %s for plugin %s", name, plugin_id)
    return True
