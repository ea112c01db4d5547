"""DataPlaneServices from YAML manifests in directories, reloaded when the files change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bridge.apis import DataPlaneService, InvalidObject

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class ManifestProblem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class ManifestService(DataPlaneService):
    """A DataPlaneService loaded from a manifest file, which it remembers (``source``).

    The route table gives these precedence over stored objects of the same group/version:
    a manifest is a file the operator configured, a stored object came through the API.
    """

    source: Path = Path()

    @classmethod
    def loaded(cls, service: DataPlaneService, source: Path) -> ManifestService:
        return cls(
            name=service.name,
            plugin_id=service.plugin_id,
            plugin_type=service.plugin_type,
            group=service.group,
            version=service.version,
            services=service.services,
            object=service.object,
            source=source,
        )

    @property
    def origin(self) -> str:
        return f"manifest {self.source}"


@dataclass(frozen=True, slots=True)
class ManifestSet:
    services: tuple[ManifestService, ...]
    problems: tuple[ManifestProblem, ...]


def load_manifests(directories: Iterable[Path]) -> ManifestSet:
    """Every DataPlaneService document in every ``*.yaml``/``*.yml``/``*.json`` file, sorted.

    A bad document is reported and skipped; the others still load.
    """
    services: dict[str, ManifestService] = {}
    problems: list[ManifestProblem] = []
    for directory in directories:
        if not directory.is_dir():
            problems.append(ManifestProblem(directory, "is not a directory"))
            continue
        for path in sorted(p for p in directory.iterdir() if p.suffix in _SUFFIXES and p.is_file()):
            try:
                documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(ManifestProblem(path, f"cannot read: {exc}"))
                continue
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                problems.append(
                    ManifestProblem(path, f"not valid YAML: {where}{getattr(exc, 'problem', exc)}")
                )
                continue
            for index, document in enumerate(documents):
                if document is None:
                    continue
                label = f"document {index + 1}"
                if not isinstance(document, dict):
                    problems.append(ManifestProblem(path, f"{label} is not an object"))
                    continue
                if document.get("kind") != "DataPlaneService":
                    continue  # other kinds may share the directory
                try:
                    service = DataPlaneService.from_object(document)
                except InvalidObject as exc:
                    problems.append(ManifestProblem(path, f"{label}: {exc}"))
                    continue
                if service.name in services:
                    problems.append(
                        ManifestProblem(path, f"{label}: {service.name} is defined twice")
                    )
                    continue
                services[service.name] = ManifestService.loaded(service, path)
    return ManifestSet(
        services=tuple(services[n] for n in sorted(services)), problems=tuple(problems)
    )


class ManifestWatcher:
    """Reloads manifests when any file changes and hands each new set to ``on_change``."""

    def __init__(
        self,
        directories: tuple[Path, ...],
        *,
        on_change: Callable[[ManifestSet], None],
        interval: float = 2.0,
    ) -> None:
        self.directories = directories
        self._on_change = on_change
        self._interval = interval
        self._fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self._reported: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> ManifestSet:
        fingerprint = await asyncio.to_thread(self._scan)
        manifests = await asyncio.to_thread(load_manifests, self.directories)
        self._fingerprint = fingerprint
        self._report(manifests)
        self._on_change(manifests)
        return manifests

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="manifest-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await asyncio.to_thread(self._scan) != self._fingerprint:
                    await self.load()
            except Exception:
                log.exception(
                    "reloading DataPlaneService manifests failed; keeping the current set"
                )

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        found: list[tuple[str, int, int]] = []
        for directory in self.directories:
            try:
                entries = list(directory.iterdir())
            except OSError:
                continue
            for path in entries:
                if path.suffix in _SUFFIXES:
                    try:
                        stat = path.stat()
                    except OSError:
                        continue
                    found.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(found))

    def _report(self, manifests: ManifestSet) -> None:
        # Each problem is logged once, not on every reload.
        current = {str(p) for p in manifests.problems}
        for problem in sorted(current - self._reported):
            log.error("ignoring DataPlaneService manifest: %s", problem)
        self._reported = current
