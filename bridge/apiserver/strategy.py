"""The REST strategy of DataPlaneServices: what a create, update or status update may change.

As upstream's strategy (reference §1.5): a main-resource update keeps the stored ``status``;
a ``/status`` update keeps everything but ``status``; updates must carry
``metadata.resourceVersion``; an update never creates. On top of upstream, objects are
validated (``DataPlaneService.from_object`` plus metadata), ``status`` is dropped on create
(it belongs to the availability controller), ``metadata.generation`` counts spec changes,
and unknown fields are pruned and reported per ``fieldValidation``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from bridge.apis import GROUP, KIND, VERSION, Cause, DataPlaneService, InvalidObject
from bridge.apiserver import errors, schema

FIELD_VALIDATION = ("Ignore", "Warn", "Strict")
# Metadata the server owns: never taken from a create, always kept from the stored object.
_SERVER_OWNED = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")
_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_QUALIFIED = re.compile(
    rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$"
)
_LABEL_VALUE = re.compile(rf"^{_NAME}?$")


@dataclass(frozen=True, slots=True)
class WriteOptions:
    """The query parameters of a write: ``dryRun``, ``fieldValidation``, ``fieldManager``."""

    dry_run: bool = False
    field_validation: str = "Warn"
    field_manager: str = ""
    force: bool = False

    @classmethod
    def from_query(cls, query: MultiMapping[str]) -> WriteOptions:
        dry_run = query.getall("dryRun", [])
        for value in dry_run:
            if value != "All":
                raise errors.bad_request(f"dryRun: unsupported value {value!r}: only All")
        validation = query.get("fieldValidation", "") or "Warn"
        if validation not in FIELD_VALIDATION:
            raise errors.bad_request(
                f"fieldValidation: unsupported value {validation!r}: "
                f"use one of {', '.join(FIELD_VALIDATION)}"
            )
        manager = query.get("fieldManager", "")
        if len(manager) > 128:
            raise errors.bad_request("fieldManager must be at most 128 characters")
        force = query.get("force", "")
        if force not in ("", "true", "false"):
            raise errors.bad_request(f"force: unsupported value {force!r}")
        return cls(bool(dry_run), validation, manager, force == "true")


def check_fields(
    obj: dict[str, Any], duplicates: Sequence[str], options: WriteOptions
) -> list[str]:
    """Prune undeclared fields; returns the warnings to send, or raises 400 under Strict."""
    problems = [f'unknown field "{path}"' for path in schema.prune(obj)]
    problems += [f'duplicate field "{name}"' for name in duplicates]
    if not problems or options.field_validation == "Ignore":
        return []
    if options.field_validation == "Strict":
        raise errors.bad_request(
            f'{KIND} in version "{VERSION}" cannot be handled as a {KIND}: '
            f"strict decoding error: {', '.join(problems)}"
        )
    return problems


def metadata_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise errors.bad_request("metadata must be an object")
    return metadata


def _metadata_causes(metadata: Mapping[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    for key, check_values in (("labels", True), ("annotations", False)):
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            causes.append(Cause(f"metadata.{key}", "Invalid value: must be a map of strings"))
            continue
        for name, text in value.items():
            if not isinstance(text, str):
                causes.append(
                    Cause(f"metadata.{key}", f'Invalid value: "{name}": the value must be a string')
                )
            elif not _QUALIFIED.match(name) or len(name) > 316:
                causes.append(
                    Cause(
                        f"metadata.{key}",
                        f'Invalid value: "{name}": must be a qualified name ([prefix/]name, '
                        "alphanumerics, '-', '_' or '.')",
                    )
                )
            elif check_values and (len(text) > 63 or not _LABEL_VALUE.match(text)):
                causes.append(
                    Cause(
                        "metadata.labels",
                        f'Invalid value: "{text}": a label value must be at most 63 '
                        "alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
                    )
                )
    finalizers = metadata.get("finalizers")
    if finalizers is not None and not (
        isinstance(finalizers, list)
        and all(isinstance(f, str) and _QUALIFIED.match(f) for f in finalizers)
    ):
        causes.append(
            Cause("metadata.finalizers", "Invalid value: must be a list of qualified names")
        )
    return causes


def _reserved_group(obj: Mapping[str, Any]) -> list[Cause]:
    spec = obj.get("spec")
    if isinstance(spec, Mapping) and spec.get("group") == GROUP:
        # Its routes would sit under this API's own paths, which are mounted first.
        return [
            Cause(
                "spec.group",
                f'Invalid value: "{GROUP}": the DataPlaneService API\'s own group cannot be '
                "served by a plugin",
            )
        ]
    return []


def validate(obj: Mapping[str, Any]) -> DataPlaneService:
    """The typed object, or 422 ``Invalid`` listing every bad field."""
    causes = _metadata_causes(metadata_of(obj)) + _reserved_group(obj)
    name = str(metadata_of(obj).get("name") or "")
    try:
        service = DataPlaneService.from_object(obj)
    except InvalidObject as exc:
        causes = [*exc.causes, *causes]
        name = exc.name or name
    else:
        if not causes:
            return service
    raise errors.invalid(name, causes)


def prepare_for_create(obj: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(obj)
    metadata = metadata_of(result)
    if metadata.get("resourceVersion"):
        raise errors.bad_request("resourceVersion should not be set on objects to be created")
    for key in (*_SERVER_OWNED, "namespace", "selfLink"):
        metadata.pop(key, None)
    metadata["generation"] = 1
    result["metadata"] = metadata
    result.pop("status", None)
    return result


def _check_uid(new: Mapping[str, Any], old: Mapping[str, Any]) -> None:
    uid = metadata_of(new).get("uid")
    stored = metadata_of(old).get("uid")
    if uid and uid != stored:
        raise errors.conflict(
            str(metadata_of(old).get("name", "")),
            f"Precondition failed: UID in precondition: {uid}, UID in object meta: {stored}",
        )


def _keep_server_owned(metadata: dict[str, Any], old: Mapping[str, Any]) -> None:
    for key in _SERVER_OWNED:
        if key in old:
            metadata[key] = copy.deepcopy(old[key])
        else:
            metadata.pop(key, None)


def _check_finalizers(metadata: Mapping[str, Any], old: Mapping[str, Any]) -> None:
    if not old.get("deletionTimestamp"):
        return
    added = set(metadata.get("finalizers") or []) - set(old.get("finalizers") or [])
    if added:
        raise errors.invalid(
            str(old.get("name", "")),
            [
                Cause(
                    "metadata.finalizers",
                    f"Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)}",
                    "FieldValueForbidden",
                )
            ],
        )


def prepare_for_update(new: dict[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
    """A main-resource update: everything but ``status`` and server-owned metadata."""
    _check_uid(new, old)
    result = copy.deepcopy(new)
    metadata = metadata_of(result)
    old_metadata = metadata_of(old)
    _check_finalizers(metadata, old_metadata)
    _keep_server_owned(metadata, old_metadata)
    metadata.pop("namespace", None)
    metadata.pop("selfLink", None)
    if "managedFields" not in metadata and "managedFields" in old_metadata:
        metadata["managedFields"] = copy.deepcopy(old_metadata["managedFields"])
    generation = old_metadata.get("generation")
    generation = generation if isinstance(generation, int) else 1
    metadata["generation"] = generation + (1 if result.get("spec") != old.get("spec") else 0)
    result["metadata"] = metadata
    if "status" in old:
        result["status"] = copy.deepcopy(old["status"])
    else:
        result.pop("status", None)
    return result


def prepare_for_status_update(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
    """A ``/status`` update: only ``status`` changes; the rest is the stored object's."""
    _check_uid(new, old)
    result = copy.deepcopy(dict(old))
    if new.get("status") is not None:
        result["status"] = copy.deepcopy(new["status"])
    else:
        result.pop("status", None)
    new_metadata = metadata_of(new)
    if "managedFields" in new_metadata:
        metadata_of(result)["managedFields"] = copy.deepcopy(new_metadata["managedFields"])
    return result


def requested_version(obj: Mapping[str, Any]) -> int | None:
    """``metadata.resourceVersion`` as the store's integer; junk is 400, absence None."""
    value = metadata_of(obj).get("resourceVersion")
    if value in (None, ""):
        return None
    try:
        version = int(str(value))
    except ValueError:
        raise errors.bad_request(f"invalid resourceVersion {value!r}") from None
    if version < 0:
        raise errors.bad_request(f"invalid resourceVersion {value!r}")
    return version


def require_version(obj: Mapping[str, Any], name: str) -> int:
    """AllowUnconditionalUpdate is false: an update without resourceVersion is 422."""
    version = requested_version(obj)
    if version is None:
        raise errors.invalid(
            name,
            [
                Cause(
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                )
            ],
        )
    return version


def check_name(obj: dict[str, Any], name: str) -> None:
    """The body may omit the name (it is the URL's) but not contradict it."""
    metadata = metadata_of(obj)
    obj["metadata"] = metadata
    given = metadata.get("name")
    if given in (None, ""):
        metadata["name"] = name
    elif given != name:
        raise errors.bad_request(
            f"the name of the object ({given}) does not match the name on the URL ({name})"
        )
