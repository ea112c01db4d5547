"""Datasource and app settings read from Grafana's own provisioning files, reloaded on change.

Each configured directory is a Grafana provisioning root (``/etc/grafana/provisioning``):
``datasources/*.yaml|yml`` holds ``datasources:`` and ``deleteDatasources:``, and
``plugins/*.yaml|yml`` holds app settings under ``apps:``. Files are read in name order, root
by root, and applied like Grafana applies them to its database: a file's deletions first, then
its datasources, a later definition of the same (org, name) replacing an earlier one. The
store shows exactly what the files say now (as with Grafana's ``prune: true``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bridge.provisioning_reader import (
    AppEntry,
    DataSourceEntry,
    ProvisioningError,
    SourceFile,
    read_apps_file,
    read_datasources_file,
)
from bridge.status import StatusError

__all__ = [
    "AppSettings",
    "DataSourceSettings",
    "ProvisioningError",
    "ProvisioningSettings",
    "ProvisioningState",
    "ProvisioningStore",
    "datasource_id",
    "load_provisioning",
]

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml")
# 53 bits: the id survives a round trip through JavaScript numbers in Grafana's frontend.
_ID_MASK = 2**53 - 1


class ProvisioningSettings(BaseModel):
    """The ``provisioning`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directories: tuple[Path, ...] = ()
    reload_interval: float = Field(default=5.0, gt=0)


@dataclass(frozen=True, slots=True)
class DataSourceSettings:
    """One provisioned datasource, with secrets decrypted (they never appear in its repr)."""

    id: int
    uid: str
    org_id: int
    name: str
    type: str
    url: str
    user: str
    database: str
    basic_auth: bool
    basic_auth_user: str
    is_default: bool
    json_data: Mapping[str, Any]
    secure_json_data: Mapping[str, str] = field(repr=False)
    last_updated_ms: int
    source: str


@dataclass(frozen=True, slots=True)
class AppSettings:
    """An app plugin's settings in one org (secrets never appear in its repr)."""

    plugin_id: str
    org_id: int
    enabled: bool = True
    json_data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    secure_json_data: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    last_updated_ms: int = 0
    source: str = ""

    @classmethod
    def unprovisioned(cls, org_id: int, plugin_id: str) -> AppSettings:
        """What an app gets when no file provisions it: enabled, empty settings."""
        return cls(plugin_id=plugin_id, org_id=org_id)


def datasource_id(org_id: int, uid: str) -> int:
    """A stable, non-zero datasource id derived from (org, uid).

    Grafana's SQL id is what the SDK keys datasource instances on; deriving it keeps it the
    same across restarts and reloads without any stored state.
    """
    digest = hashlib.sha256(f"{org_id}/{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & _ID_MASK or 1


@dataclass(frozen=True, slots=True)
class ProvisioningState:
    """Everything the files provision, indexed for lookup; never mutated once built."""

    datasources: Mapping[tuple[int, str], DataSourceSettings]
    apps: Mapping[tuple[int, str], AppSettings]
    # Secret files read through $__file{}: rotating one is a change like editing a file.
    dependencies: tuple[Path, ...]
    fingerprint: tuple[tuple[str, int, int, int], ...]
    digests: Mapping[tuple[str, int, str], str]

    @classmethod
    def empty(cls) -> ProvisioningState:
        return cls(MappingProxyType({}), MappingProxyType({}), (), (), MappingProxyType({}))


def load_provisioning(
    directories: tuple[Path, ...],
    *,
    env: Mapping[str, str],
    previous: ProvisioningState | None = None,
) -> ProvisioningState:
    """Read every provisioning file under ``directories`` into a new state.

    ``previous`` keeps ``lastUpdatedMS`` of unchanged entries, so reloading one file does not
    make the SDK recreate instances whose settings are the same; a changed entry always gets
    a larger value than before.
    """
    previous = previous or ProvisioningState.empty()
    ds_files, app_files = _files(directories)
    datasource_sources = [read_datasources_file(path, env=env) for path in ds_files]
    app_sources = [read_apps_file(path, env=env) for path in app_files]
    sources: list[SourceFile[Any]] = [*datasource_sources, *app_sources]
    dependencies: dict[Path, None] = {}
    for source in sources:
        dependencies.update(dict.fromkeys(source.dependencies))
    digests: dict[tuple[str, int, str], str] = {}
    datasources = _datasources(datasource_sources, previous, digests)
    apps = _apps(app_sources, previous, digests)
    for source in sources:
        for warning in source.warnings:
            log.warning("%s", warning)
    return ProvisioningState(
        datasources=MappingProxyType(datasources),
        apps=MappingProxyType(apps),
        dependencies=tuple(dependencies),
        fingerprint=_fingerprint([*ds_files, *app_files, *dependencies]),
        digests=MappingProxyType(digests),
    )


def _files(directories: tuple[Path, ...]) -> tuple[list[Path], list[Path]]:
    datasources: list[Path] = []
    apps: list[Path] = []
    for root in directories:
        if not root.is_dir():
            raise ProvisioningError("provisioning directory does not exist", path=root)
        datasources.extend(_yaml_files(root / "datasources"))
        apps.extend(_yaml_files(root / "plugins"))
    return datasources, apps


def _yaml_files(directory: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ProvisioningError(
            f"cannot list the directory: {exc.strerror}", path=directory
        ) from None
    return [
        Path(e.path) for e in entries if e.name.endswith(_SUFFIXES) and e.is_file()
    ]  # Grafana does not recurse into subdirectories either


def _fingerprint(paths: list[Path]) -> tuple[tuple[str, int, int, int], ...]:
    stamps = []
    for path in dict.fromkeys(paths):
        try:
            st = path.stat()
        except OSError:
            stamps.append((str(path), -1, -1, -1))
        else:
            stamps.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sorted(stamps))


def _datasources(
    sources: list[SourceFile[DataSourceEntry]],
    previous: ProvisioningState,
    digests: dict[tuple[str, int, str], str],
) -> dict[tuple[int, str], DataSourceSettings]:
    by_name: dict[tuple[int, str], tuple[DataSourceEntry, SourceFile[DataSourceEntry]]] = {}
    default_of_org: dict[int, DataSourceEntry] = {}
    for source in sources:
        for deletion in source.deletions:
            by_name.pop((deletion.org_id, deletion.name), None)
        for entry in source.entries:
            if entry.is_default:
                first = default_of_org.setdefault(entry.org_id, entry)
                if first is not entry:
                    raise ProvisioningError(
                        f"only one datasource per org can be the default: {entry.name!r} and "
                        f"{first.name!r} ({first.where}) are both isDefault in org "
                        f"{entry.org_id}",
                        path=entry.path,
                        line=entry.line,
                        key="isDefault",
                    )
            replaced = by_name.get((entry.org_id, entry.name))
            if replaced is not None:
                log.warning(
                    "datasource %r in org %d is defined in %s and again in %s; the later "
                    "definition wins, as in Grafana",
                    entry.name,
                    entry.org_id,
                    replaced[0].where,
                    entry.where,
                )
            by_name[(entry.org_id, entry.name)] = (entry, source)

    result: dict[tuple[int, str], DataSourceSettings] = {}
    by_id: dict[int, DataSourceEntry] = {}
    for entry, source in by_name.values():
        key = (entry.org_id, entry.uid)
        clash = result.get(key)
        if clash is not None:
            raise ProvisioningError(
                f"uid {entry.uid!r} is used twice in org {entry.org_id}: by {entry.name!r} "
                f"here and by {clash.name!r} in {clash.source}",
                path=entry.path,
                line=entry.line,
                key="uid",
            )
        ds_id = datasource_id(entry.org_id, entry.uid)
        if (other := by_id.setdefault(ds_id, entry)) is not entry:
            raise ProvisioningError(
                f"datasources {entry.uid!r} and {other.uid!r} ({other.where}) hash to the same "
                "id; change one uid",
                path=entry.path,
                line=entry.line,
                key="uid",
            )
        digest = _digest(entry.content())
        stamp = _updated_ms(("datasource", entry.org_id, entry.uid), digest, source, previous)
        digests[("datasource", entry.org_id, entry.uid)] = digest
        result[key] = DataSourceSettings(
            id=ds_id,
            uid=entry.uid,
            org_id=entry.org_id,
            name=entry.name,
            type=entry.type,
            url=entry.url,
            user=entry.user,
            database=entry.database,
            basic_auth=entry.basic_auth,
            basic_auth_user=entry.basic_auth_user,
            is_default=entry.is_default,
            json_data=MappingProxyType(entry.json_data),
            secure_json_data=MappingProxyType(entry.secure_json_data),
            last_updated_ms=stamp,
            source=entry.where,
        )
    return result


def _apps(
    sources: list[SourceFile[AppEntry]],
    previous: ProvisioningState,
    digests: dict[tuple[str, int, str], str],
) -> dict[tuple[int, str], AppSettings]:
    chosen: dict[tuple[int, str], tuple[AppEntry, SourceFile[AppEntry]]] = {}
    for source in sources:
        for entry in source.entries:
            replaced = chosen.get((entry.org_id, entry.plugin_id))
            if replaced is not None:
                log.warning(
                    "app %r in org %d is configured in %s and again in %s; the later wins",
                    entry.plugin_id,
                    entry.org_id,
                    replaced[0].where,
                    entry.where,
                )
            chosen[(entry.org_id, entry.plugin_id)] = (entry, source)
    result: dict[tuple[int, str], AppSettings] = {}
    for (org_id, plugin_id), (entry, source) in chosen.items():
        digest = _digest(entry.content())
        stamp = _updated_ms(("app", org_id, plugin_id), digest, source, previous)
        digests[("app", org_id, plugin_id)] = digest
        result[(org_id, plugin_id)] = AppSettings(
            plugin_id=plugin_id,
            org_id=org_id,
            enabled=entry.enabled,
            json_data=MappingProxyType(entry.json_data),
            secure_json_data=MappingProxyType(entry.secure_json_data),
            last_updated_ms=stamp,
            source=entry.where,
        )
    return result


def _digest(content: Any) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _updated_ms(
    key: tuple[str, int, str],
    digest: str,
    source: SourceFile[Any],
    previous: ProvisioningState,
) -> int:
    """The file's mtime (or a secret file's, whichever is newer), kept while content is same."""
    before = _previous_stamp(key, previous)
    if before is not None and previous.digests.get(key) == digest:
        return before
    stamp = source.modified_ms
    return max(stamp, before + 1) if before is not None else stamp


def _previous_stamp(key: tuple[str, int, str], previous: ProvisioningState) -> int | None:
    kind, org_id, name = key
    if kind == "datasource":
        ds = previous.datasources.get((org_id, name))
        return ds.last_updated_ms if ds is not None else None
    app = previous.apps.get((org_id, name))
    return app.last_updated_ms if app is not None else None


class ProvisioningStore:
    """The current provisioning state, swapped atomically when the files change.

    Built from ``settings`` and an explicit environment (for ``$VAR`` expansion); the first
    load must succeed. ``watch()`` polls file stamps every ``reload_interval`` seconds; a
    change that breaks a file keeps the last good state, logs the error once and exposes it
    as ``last_error`` until a good version arrives.
    """

    def __init__(self, settings: ProvisioningSettings, *, env: Mapping[str, str]) -> None:
        self._settings = settings
        self._env = dict(env)
        self._state = load_provisioning(settings.directories, env=self._env)
        self._changed = asyncio.Condition()
        self.generation = 1
        self.last_error: ProvisioningError | None = None
        _log_loaded(self._state)

    @property
    def state(self) -> ProvisioningState:
        return self._state

    def lookup_datasource(self, org_id: int, uid: str) -> DataSourceSettings | None:
        return self._state.datasources.get((org_id, uid))

    def datasource(
        self, org_id: int, uid: str, *, plugin_id: str | None = None
    ) -> DataSourceSettings:
        """The datasource, or a 404 ``StatusError`` if the org has none with that uid/type.

        A uid that belongs to another plugin's datasource is a 404 for this plugin, so a
        request can never send one plugin's settings (and secrets) to another.
        """
        ds = self.lookup_datasource(org_id, uid)
        if ds is None:
            raise StatusError(404, f"datasource {uid!r} not found in org {org_id}")
        if plugin_id is not None and ds.type != plugin_id:
            raise StatusError(
                404,
                f"datasource {uid!r} in org {org_id} is a {ds.type!r} datasource, "
                f"not {plugin_id!r}",
            )
        return ds

    def datasources(self, org_id: int | None = None) -> list[DataSourceSettings]:
        return [ds for ds in self._state.datasources.values() if org_id in (None, ds.org_id)]

    def lookup_app(self, org_id: int, plugin_id: str) -> AppSettings | None:
        return self._state.apps.get((org_id, plugin_id))

    def check(self) -> bool:
        """Reload now if any file changed; True when a new state was installed."""
        return self._apply(self._prepare())

    async def watch(self) -> None:
        """Poll for changes until cancelled; the caller owns and awaits this task."""
        while True:
            await asyncio.sleep(self._settings.reload_interval)
            outcome = await asyncio.to_thread(self._prepare)
            if self._apply(outcome):
                async with self._changed:
                    self._changed.notify_all()

    async def wait_for_generation(self, generation: int) -> None:
        """Return once ``watch()`` has installed state number ``generation`` (or later)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation >= generation)

    def _prepare(self) -> ProvisioningState | ProvisioningError | None:
        """A new state, the error that prevents one, or None when nothing changed."""
        current = self._state
        if self.last_error is None:
            try:
                ds_files, app_files = _files(self._settings.directories)
            except ProvisioningError as exc:
                return exc
            paths = [*ds_files, *app_files, *current.dependencies]
            if _fingerprint(paths) == current.fingerprint:
                return None
        # While broken, every poll retries: the fix may be a secret file appearing.
        try:
            return load_provisioning(self._settings.directories, env=self._env, previous=current)
        except ProvisioningError as exc:
            return exc

    def _apply(self, outcome: ProvisioningState | ProvisioningError | None) -> bool:
        if outcome is None:
            return False
        if isinstance(outcome, ProvisioningError):
            if self.last_error is None or str(self.last_error) != str(outcome):
                log.error("provisioning not reloaded, keeping the last good state: %s", outcome)
            self.last_error = outcome
            return False
        self._state = outcome
        self.last_error = None
        self.generation += 1
        _log_loaded(outcome)
        return True


def _log_loaded(state: ProvisioningState) -> None:
    log.info(
        "provisioning loaded: %d datasources, %d apps",
        len(state.datasources),
        len(state.apps),
    )
