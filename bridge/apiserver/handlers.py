"""The DataPlaneService REST handlers: get, list, watch, create, update, patch and delete.

One :class:`DataPlaneServiceAPI` holds the store and the caller check. Reads need an
authenticated caller; writes need a Grafana server admin or an Admin of the main org
(``may_write``).
Each handler parses its request, applies the strategy (bridge/apiserver/strategy.py) and
maps storage failures with :func:`errors.from_store_error`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bridge.apis import API_VERSION, KIND
from bridge.apiserver import errors, patch, strategy, table
from bridge.apiserver.negotiation import (
    Format,
    Output,
    decode,
    encode,
    media_type,
    negotiate,
    read_object,
)
from bridge.apiserver.selectors import Selection
from bridge.apiserver.strategy import WriteOptions
from bridge.apiserver.watch import WatchRequest, serve_watch
from bridge.identity import Identity, OrgRole
from bridge.status import StatusError
from bridge.storage import NotFound, Store, StoreError

Authenticate = Callable[[web.Request], Awaitable[Identity]]
Clock = Callable[[], datetime]

LIST_KIND = f"{KIND}List"
WRITE_DENIED = "only Grafana server admins and admins of the main org may change DataPlaneServices"
MAIN_ORG_ID = 1


def may_write(identity: Identity) -> bool:
    """The default write policy: a Grafana server admin, or an Admin of the main org (1).

    DataPlaneServices are cluster-wide: one routes a group for every org. An Admin of any
    other org is a tenant, and must not be able to reroute or remove other tenants' APIs.
    """
    return identity.is_server_admin or (
        identity.org_id == MAIN_ORG_ID and identity.role >= OrgRole.ADMIN
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _version(obj: Mapping[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("resourceVersion") or 0)


class DataPlaneServiceAPI:
    """The ``dataplaneservices`` resource over one :class:`Store`.

    ``authenticate`` answers who is calling (raising 401 itself when nobody is);
    ``may_write`` decides who may change objects. ``watch_timeout`` bounds a watch without
    ``timeoutSeconds``; ``bookmark_interval`` spaces BOOKMARK events on idle watches.
    """

    def __init__(
        self,
        store: Store,
        authenticate: Authenticate,
        *,
        may_write: Callable[[Identity], bool] = may_write,
        watch_timeout: float = 1800.0,
        bookmark_interval: float = 60.0,
        patch_retries: int = 5,
        clock: Clock = _utc_now,
    ) -> None:
        self.store = store
        self._authenticate = authenticate
        self._may_write = may_write
        self.watch_timeout = watch_timeout
        self.bookmark_interval = bookmark_interval
        self._patch_retries = patch_retries
        self._clock = clock

    # -- callers -----------------------------------------------------------------------------

    async def _reader(self, request: web.Request) -> Identity:
        return await self._authenticate(request)

    def signed_in(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``handler`` for any authenticated caller (discovery, OpenAPI); others get 401."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            await self._authenticate(request)
            return await handler(request)

        guarded.__name__ = getattr(handler, "__name__", "guarded")
        return guarded

    async def _writer(
        self, request: web.Request, verb: str, name: str | None, subresource: str | None = None
    ) -> Identity:
        identity = await self._authenticate(request)
        if not self._may_write(identity):
            raise errors.forbidden(
                identity, verb, name=name, subresource=subresource, why=WRITE_DENIED
            )
        return identity

    # -- rendering ---------------------------------------------------------------------------

    def _render(self, obj: Mapping[str, Any], output: Output, include: str) -> Mapping[str, Any]:
        if output.format is not Format.TABLE:
            return obj
        metadata = {"resourceVersion": str((obj.get("metadata") or {}).get("resourceVersion", ""))}
        return table.table(
            [obj],
            list_metadata=metadata,
            include=include,
            version=output.table_version,
            now=self._clock(),
        )

    def _answer(
        self,
        obj: Mapping[str, Any],
        output: Output,
        *,
        status: int = 200,
        warnings: Sequence[str] = (),
    ) -> web.Response:
        response = encode(obj, output, status=status)
        for warning in warnings:
            response.headers.add("Warning", f"299 - {json.dumps(warning)}")
        return response

    async def _stored(self, name: str) -> dict[str, Any]:
        try:
            return await self.store.get(name)
        except StoreError as exc:
            raise errors.from_store_error(exc, name) from None

    # -- reads -------------------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.StreamResponse:
        """``GET …/dataplaneservices/{name}`` and ``…/{name}/status`` (the whole object)."""
        await self._reader(request)
        output = negotiate(request, table=True)
        include = table.include_object(request.query)
        obj = await self._stored(request.match_info["name"])
        return self._answer(self._render(obj, output, include), output)

    async def list_or_watch(self, request: web.Request) -> web.StreamResponse:
        """``GET …/dataplaneservices``: a list, or with ``watch=true`` a watch stream."""
        await self._reader(request)
        output = negotiate(request, table=True)
        include = table.include_object(request.query)
        selection = Selection.from_query(request.query)
        if request.query.get("watch", "") in ("true", "1"):
            params = WatchRequest.from_query(request.query, default_timeout=self.watch_timeout)
            return await serve_watch(
                request,
                self.store,
                params,
                selection,
                lambda obj: self._render(obj, output, include),
                bookmark_interval=self.bookmark_interval,
            )
        items, metadata = await self._page(request.query, selection)
        if output.format is Format.TABLE:
            body: Mapping[str, Any] = table.table(
                items,
                list_metadata=metadata,
                include=include,
                version=output.table_version,
                now=self._clock(),
            )
        else:
            body = {
                "kind": LIST_KIND,
                "apiVersion": API_VERSION,
                "metadata": metadata,
                "items": items,
            }
        return self._answer(body, output)

    async def _page(
        self, query: Mapping[str, str], selection: Selection
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The selected objects of one list page and its ListMeta (kube's list semantics)."""
        requested, match = _list_version(query)
        limit = _limit(query)
        token = query.get("continue", "")
        if token and (requested is not None or match):
            raise errors.bad_request(
                "specifying resourceVersion or resourceVersionMatch is not allowed with continue"
            )
        try:
            items, current = await self.store.list()
        except StoreError as exc:
            raise errors.from_store_error(exc) from None
        if requested is not None and requested > current:
            raise errors.too_large_resource_version(requested, current)
        if match == "Exact" and requested != current:
            raise errors.expired(
                f"too old resource version: {requested} (current: {current}); "
                "this server can only list at the current resource version"
            )
        start_after = ""
        if token:
            start_after = _decode_continue(token, current)
        chosen = [item for item in items if selection.matches(item) and _name(item) > start_after]
        metadata: dict[str, Any] = {"resourceVersion": str(current)}
        if limit and len(chosen) > limit:
            rest = len(chosen) - limit
            chosen = chosen[:limit]
            metadata["continue"] = _encode_continue(current, _name(chosen[-1]))
            if selection.everything:
                metadata["remainingItemCount"] = rest
        return chosen, metadata

    # -- writes ------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        """``POST …/dataplaneservices``: 201 with the stored object."""
        await self._writer(request, "create", None)
        options = WriteOptions.from_query(request.query)
        output = negotiate(request)
        decoded = await read_object(request)
        given = decoded.value
        warnings = strategy.check_fields(given, decoded.duplicates, options)
        obj = strategy.prepare_for_create(given)
        strategy.validate(obj)
        stored = await self._create(obj, options)
        return self._answer(stored, output, status=201, warnings=warnings)

    async def _create(self, obj: dict[str, Any], options: WriteOptions) -> dict[str, Any]:
        name = _name(obj)
        try:
            if options.dry_run:
                try:
                    await self.store.get(name)
                except NotFound:
                    preview = copy.deepcopy(obj)
                    preview["metadata"]["uid"] = str(uuid.uuid4())
                    preview["metadata"]["creationTimestamp"] = _timestamp(self._clock())
                    return preview
                raise errors.already_exists(name)
            return await self.store.create(obj)
        except StoreError as exc:
            raise errors.from_store_error(exc, name) from None

    async def update(self, request: web.Request) -> web.StreamResponse:
        """``PUT …/{name}`` (and ``…/{name}/status``): needs metadata.resourceVersion."""
        name = request.match_info["name"]
        subresource = _subresource(request)
        await self._writer(request, "update", name, subresource)
        options = WriteOptions.from_query(request.query)
        output = negotiate(request)
        decoded = await read_object(request)
        given = decoded.value
        strategy.check_name(given, name)
        warnings = strategy.check_fields(given, decoded.duplicates, options)
        expected = strategy.require_version(given, name)
        old = await self._stored(name)
        if subresource:
            new = strategy.prepare_for_status_update(given, old)
        else:
            new = strategy.prepare_for_update(given, old)
        strategy.validate(new)
        stored, code = await self._write(name, new, old, expected, options)
        return self._answer(stored, output, status=code, warnings=warnings)

    async def _write(
        self,
        name: str,
        new: dict[str, Any],
        old: Mapping[str, Any],
        expected: int,
        options: WriteOptions,
    ) -> tuple[dict[str, Any], int]:
        """Store an update made from ``old``; an object whose last finalizer went is removed."""
        if expected != _version(old):
            raise errors.modified(name)
        metadata = new.get("metadata") or {}
        finished = bool(metadata.get("deletionTimestamp")) and not metadata.get("finalizers")
        if options.dry_run:
            preview = copy.deepcopy(new)
            preview["metadata"]["resourceVersion"] = str(_version(old))
            return preview, 200
        try:
            if finished:
                await self.store.update(new, expected_version=expected)
                return await self.store.delete(name), 200
            return await self.store.update(new, expected_version=expected), 200
        except StoreError as exc:
            raise errors.from_store_error(exc, name) from None

    async def patch(self, request: web.Request) -> web.StreamResponse:
        """``PATCH …/{name}`` (and ``…/status``): merge, JSON, or server-side apply."""
        name = request.match_info["name"]
        subresource = _subresource(request)
        await self._writer(request, "patch", name, subresource)
        kind = media_type(request)
        if kind not in patch.SUPPORTED:
            raise errors.unsupported_media_type(kind, patch.SUPPORTED)
        options = WriteOptions.from_query(request.query)
        if kind == patch.APPLY_PATCH and not options.field_manager:
            raise errors.bad_request("fieldManager is required for apply requests")
        output = negotiate(request)
        decoded = decode(
            await request.read(), "application/yaml" if kind == patch.APPLY_PATCH else kind
        )
        for _ in range(self._patch_retries):
            try:
                current: dict[str, Any] | None = await self.store.get(name)
            except NotFound:
                if kind != patch.APPLY_PATCH or subresource:
                    raise errors.not_found(name) from None
                current = None
            except StoreError as exc:
                raise errors.from_store_error(exc, name) from None
            if current is None:
                return await self._apply_create(
                    name, decoded.value, decoded.duplicates, options, output
                )
            patched = self._patched(kind, current, decoded.value, options, subresource)
            strategy.check_name(patched, name)
            warnings = strategy.check_fields(patched, decoded.duplicates, options)
            requested = strategy.requested_version(patched)
            if requested is not None and requested != _version(current):
                raise errors.modified(name)
            if subresource:
                new = strategy.prepare_for_status_update(patched, current)
            else:
                new = strategy.prepare_for_update(patched, current)
            strategy.validate(new)
            try:
                stored, code = await self._write(name, new, current, _version(current), options)
            except StatusError as exc:
                if exc.reason == "Conflict":
                    continue  # written meanwhile: patch the newer version, as kube does
                raise
            return self._answer(stored, output, status=code, warnings=warnings)
        raise errors.modified(name)

    def _patched(
        self,
        kind: str,
        current: dict[str, Any],
        body: Any,
        options: WriteOptions,
        subresource: str | None,
    ) -> dict[str, Any]:
        if kind == patch.JSON_PATCH:
            return patch.json_patch(copy.deepcopy(current), body)
        if not isinstance(body, dict):
            raise errors.bad_request("a merge patch or apply configuration must be an object")
        if kind == patch.APPLY_PATCH:
            return patch.server_side_apply(
                current,
                body,
                manager=options.field_manager,
                subresource=subresource or "",
                now=self._clock(),
            )
        result = patch.merge_patch(current, body)
        if not isinstance(result, dict):  # pragma: no cover - an object patch keeps an object
            raise errors.bad_request("the patch must leave an object")
        return result

    async def _apply_create(
        self,
        name: str,
        config: Any,
        duplicates: Sequence[str],
        options: WriteOptions,
        output: Output,
    ) -> web.Response:
        """Server-side apply of an object that does not exist yet creates it."""
        if not isinstance(config, dict):
            raise errors.bad_request("an apply configuration must be an object")
        obj = patch.server_side_apply(
            None, config, manager=options.field_manager, now=self._clock()
        )
        strategy.check_name(obj, name)
        warnings = strategy.check_fields(obj, duplicates, options)
        obj = strategy.prepare_for_create(obj)
        strategy.validate(obj)
        stored = await self._create(obj, options)
        return self._answer(stored, output, status=201, warnings=warnings)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        """``DELETE …/{name}``: 200 with the removed object, or 202 while finalizers remain."""
        name = request.match_info["name"]
        await self._writer(request, "delete", name)
        options = WriteOptions.from_query(request.query)
        output = negotiate(request)
        preconditions, dry_run = await _delete_options(request)
        uid = preconditions.get("uid")
        expected = preconditions.get("resourceVersion")
        # Without a resourceVersion precondition a delete does not lose to a concurrent write
        # (the availability controller's status update, say): re-read and retry, as kube does.
        for _ in range(self._patch_retries):
            current = await self._stored(name)
            stored_uid = (current.get("metadata") or {}).get("uid")
            if uid and uid != stored_uid:
                why = f"UID in precondition: {uid}, UID in object meta: {stored_uid}"
                raise errors.conflict(name, f"Precondition failed: {why}")
            if expected is not None and expected != _version(current):
                raise errors.modified(name)
            try:
                obj, code = await self._delete_one(current, dry_run=options.dry_run or dry_run)
            except StatusError as exc:
                if exc.reason == "Conflict" and expected is None:
                    continue
                raise
            return self._answer(obj, output, status=code)
        raise errors.modified(name)

    async def _delete_one(
        self, current: dict[str, Any], *, dry_run: bool
    ) -> tuple[dict[str, Any], int]:
        name = _name(current)
        metadata = current.get("metadata") or {}
        try:
            if metadata.get("finalizers"):
                if metadata.get("deletionTimestamp"):
                    return current, 202
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = _timestamp(self._clock())
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                if dry_run:
                    return marked, 202
                return await self.store.update(marked, expected_version=_version(current)), 202
            if dry_run:
                return current, 200
            return await self.store.delete(name, expected_version=_version(current)), 200
        except StoreError as exc:
            raise errors.from_store_error(exc, name) from None

    async def delete_collection(self, request: web.Request) -> web.StreamResponse:
        """``DELETE …/dataplaneservices``: the selected objects, as a list of what was removed."""
        await self._writer(request, "deletecollection", None)
        options = WriteOptions.from_query(request.query)
        output = negotiate(request)
        selection = Selection.from_query(request.query)
        _, dry_run = await _delete_options(request)
        try:
            items, _ = await self.store.list()
        except StoreError as exc:
            raise errors.from_store_error(exc) from None
        removed: list[dict[str, Any]] = []
        for item in items:
            if not selection.matches(item):
                continue
            try:
                obj, _ = await self._delete_one(item, dry_run=options.dry_run or dry_run)
            except StatusError as exc:
                if exc.code == 404:
                    continue  # removed meanwhile
                raise
            removed.append(obj)
        return self._answer(_list(removed, {}), output)


def _list(items: list[dict[str, Any]], metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "kind": LIST_KIND,
        "apiVersion": API_VERSION,
        "metadata": dict(metadata),
        "items": items,
    }


def _subresource(request: web.Request) -> str | None:
    return "status" if request.path.endswith("/status") else None


def _list_version(query: Mapping[str, str]) -> tuple[int | None, str]:
    raw = query.get("resourceVersion", "")
    match = query.get("resourceVersionMatch", "")
    if match not in ("", "NotOlderThan", "Exact"):
        raise errors.bad_request(
            f"resourceVersionMatch: unsupported value {match!r}: use NotOlderThan or Exact"
        )
    if match and not raw:
        raise errors.bad_request(
            "resourceVersionMatch is forbidden unless resourceVersion is provided"
        )
    if match == "Exact" and raw == "0":
        raise errors.bad_request("resourceVersionMatch Exact is forbidden for resourceVersion 0")
    if raw in ("", "0"):
        return None, match
    try:
        version = int(raw)
    except ValueError:
        raise errors.bad_request(f"invalid resourceVersion {raw!r}") from None
    if version < 0:
        raise errors.bad_request(f"invalid resourceVersion {raw!r}")
    return version, match


def _limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit", "")
    if not raw:
        return 0
    try:
        limit = int(raw)
    except ValueError:
        raise errors.bad_request(f"invalid limit {raw!r}") from None
    return max(limit, 0)


def _encode_continue(version: int, last_name: str) -> str:
    token = json.dumps({"v": version, "start": last_name}, separators=(",", ":"))
    return base64.urlsafe_b64encode(token.encode()).decode()


def _decode_continue(token: str, current: int) -> str:
    """The name a continued list starts after; 410 when the list changed since page one."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        version, start = int(data["v"]), str(data["start"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise errors.bad_request("invalid continue token") from None
    if version != current:
        raise errors.expired(
            "The provided continue parameter is too old to display a consistent list result. "
            "You can start a new list without the continue parameter."
        )
    return start


async def _delete_options(request: web.Request) -> tuple[dict[str, Any], bool]:
    """``preconditions`` and ``dryRun`` of a DeleteOptions body (an empty body is fine)."""
    raw = await request.read()
    if not raw.strip():
        return {}, False
    body = decode(raw, media_type(request) or "application/json").value
    if body is None:
        return {}, False
    if not isinstance(body, dict):
        raise errors.bad_request("DeleteOptions must be an object")
    dry_run = body.get("dryRun") or []
    if not isinstance(dry_run, list) or any(v != "All" for v in dry_run):
        raise errors.bad_request('DeleteOptions.dryRun: only ["All"] is supported')
    raw_conditions = body.get("preconditions") or {}
    if not isinstance(raw_conditions, dict):
        raise errors.bad_request("DeleteOptions.preconditions must be an object")
    preconditions: dict[str, Any] = {}
    if raw_conditions.get("uid"):
        preconditions["uid"] = str(raw_conditions["uid"])
    if raw_conditions.get("resourceVersion"):
        try:
            preconditions["resourceVersion"] = int(str(raw_conditions["resourceVersion"]))
        except ValueError:
            raise errors.bad_request("invalid preconditions.resourceVersion") from None
    return preconditions, bool(dry_run)
