"""Auto-registration: a DataPlaneService for each backend plugin, derived from what it serves.

Upstream, Grafana creates the objects for app manifests at start-up. Here each running plugin
gets ``v0alpha1.<plugin id>.grafana.app`` with one service per pluginv2 service it registered
(learned from gRPC reflection). An object the bridge created carries annotations; one a user
created, or changed since, is never overwritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from bridge.apis import API_VERSION, KIND, PluginType
from bridge.storage import AlreadyExists, Conflict, NotFound, Store

log = logging.getLogger(__name__)

MANAGED_BY = "bridge.grafana.app/managed-by"
SPEC_HASH = "bridge.grafana.app/spec-hash"
MANAGER = "auto-registration"
VERSION = "v0alpha1"

# pluginv2 service → DataPlaneService service type, in the order they are listed.
_SERVICE_TYPES = (
    ("pluginv2.Data", "query"),
    ("pluginv2.Resource", "route"),
    ("pluginv2.Stream", "stream"),
    ("pluginv2.AdmissionControl", "admission"),
    ("pluginv2.ResourceConversion", "conversion"),
)
_NOT_DNS = re.compile(r"[^a-z0-9.-]+")


def group_for(plugin_id: str) -> str:
    label = _NOT_DNS.sub("-", plugin_id.lower()).strip("-.") or "plugin"
    return f"{label}.grafana.app"


def derived_object(
    plugin_id: str, plugin_type: str, served: frozenset[str] | None
) -> dict[str, Any]:
    """The DataPlaneService a plugin gets; without reflection, query and route are assumed."""
    if served is None:
        served = frozenset({"pluginv2.Data", "pluginv2.Resource"})
    group = group_for(plugin_id)
    spec = {
        "pluginID": plugin_id,
        "pluginType": PluginType.APP if plugin_type == "app" else PluginType.DATASOURCE,
        "group": group,
        "version": VERSION,
        "services": [{"type": kind} for name, kind in _SERVICE_TYPES if name in served],
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


async def auto_register(
    store: Store, plugins: Iterable[tuple[str, str, frozenset[str] | None]]
) -> list[str]:
    """Create or refresh the derived object of each ``(plugin id, type, served services)``.

    Returns the names written. An existing object is refreshed only while it is still exactly
    what the bridge wrote (its spec hashes to its annotation); otherwise a user owns it.
    """
    written: list[str] = []
    for plugin_id, plugin_type, served in plugins:
        wanted = derived_object(plugin_id, plugin_type, served)
        name = wanted["metadata"]["name"]
        try:
            current = await store.get(name)
        except NotFound:
            try:
                await store.create(wanted)
            except AlreadyExists:
                continue  # another replica was quicker
            written.append(name)
            log.info("registered DataPlaneService %s for plugin %s", name, plugin_id)
            continue
        annotations = current.get("metadata", {}).get("annotations") or {}
        if annotations.get(MANAGED_BY) != MANAGER:
            continue  # created by a user
        if annotations.get(SPEC_HASH) != spec_hash(current.get("spec")):
            log.info("DataPlaneService %s was changed by a user; auto-registration leaves it", name)
            continue
        if current.get("spec") == wanted["spec"]:
            continue
        updated = copy.deepcopy(current)
        updated["spec"] = wanted["spec"]
        updated["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec_hash(wanted["spec"])
        try:
            await store.update(
                updated, expected_version=int(current["metadata"]["resourceVersion"])
            )
        except (Conflict, NotFound):
            continue  # changed meanwhile: whoever wrote it owns it now
        written.append(name)
        log.info("updated DataPlaneService %s for plugin %s", name, plugin_id)
    return written
