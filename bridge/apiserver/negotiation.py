"""Content negotiation: which representation a client accepts, and how its body is decoded.

Clients name what they accept as kube-apiserver understands it: ``application/json``,
``application/yaml``, and for ``kubectl get`` the server-side table
``application/json;as=Table;v=v1;g=meta.k8s.io``. Representations this server does not make
(aggregated discovery ``as=APIGroupDiscoveryList``, protobuf) are skipped, so a client that
lists plain JSON after them gets plain JSON, which is how it learns the server does not have
them; a client that accepts nothing we make gets 406.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml
from aiohttp import web

from bridge.apiserver import errors

JSON = "application/json"
YAML = "application/yaml"
TABLE_GROUP = "meta.k8s.io"
TABLE_VERSIONS = ("v1", "v1beta1")


class Format(StrEnum):
    JSON = "json"
    YAML = "yaml"
    TABLE = "table"


@dataclass(frozen=True, slots=True)
class Output:
    """The representation to answer with; ``table_version`` is meta.k8s.io's for tables."""

    format: Format
    table_version: str = "v1"
    pretty: bool = False

    @property
    def content_type(self) -> str:
        if self.format is Format.YAML:
            return YAML
        if self.format is Format.TABLE:
            return f"{JSON};as=Table;v={self.table_version};g={TABLE_GROUP}"
        return JSON


@dataclass(frozen=True, slots=True)
class MediaRange:
    type: str
    params: Mapping[str, str]
    quality: float


def parse_accept(header: str) -> list[MediaRange]:
    """The ranges of an Accept header, best first (equal qualities keep their order)."""
    ranges: list[MediaRange] = []
    for part in header.split(","):
        pieces = [p.strip() for p in part.split(";")]
        if not pieces[0]:
            continue
        params: dict[str, str] = {}
        quality = 1.0
        for piece in pieces[1:]:
            key, sep, value = piece.partition("=")
            if not sep:
                continue
            key, value = key.strip().lower(), value.strip().strip('"')
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            else:
                params[key] = value
        if quality > 0:
            ranges.append(MediaRange(pieces[0].lower(), params, quality))
    ranges.sort(key=lambda r: -r.quality)
    return ranges


def _plain(media: MediaRange) -> Format | None:
    if media.params.get("as") or media.params.get("stream") not in (None, "watch"):
        return None
    if media.type in (JSON, "application/*", "*/*"):
        return Format.JSON
    if media.type == YAML:
        return Format.YAML
    return None


def negotiate(request: web.Request, *, table: bool = False) -> Output:
    """What to answer ``request`` with; raises 406 when it accepts nothing we make."""
    pretty = request.query.get("pretty", "") in ("true", "1")
    header = request.headers.get("Accept", "").strip()
    if not header:
        return Output(Format.JSON, pretty=pretty)
    for media in parse_accept(header):
        if media.params.get("as") == "Table":
            if (
                table
                and media.type in (JSON, "application/*", "*/*")
                and media.params.get("g") == TABLE_GROUP
                and media.params.get("v") in TABLE_VERSIONS
            ):
                return Output(Format.TABLE, table_version=media.params["v"], pretty=pretty)
            continue
        found = _plain(media)
        if found is not None:
            return Output(found, pretty=pretty)
    supported = [JSON, YAML]
    if table:
        supported.append(f"{JSON};as=Table;v=v1;g={TABLE_GROUP}")
    raise errors.not_acceptable(supported)


def encode(body: Mapping[str, Any], output: Output, *, status: int = 200) -> web.Response:
    if output.format is Format.YAML:
        text = yaml.safe_dump(dict(body), sort_keys=False, default_flow_style=False)
    elif output.pretty:
        text = json.dumps(body, indent=2) + "\n"
    else:
        text = json.dumps(body, separators=(",", ":"))
    response = web.Response(status=status, text=text)
    response.headers["Content-Type"] = output.content_type
    return response


# -- request bodies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decoded:
    """A request body as an object, plus the fields it named twice (for fieldValidation)."""

    value: Any
    duplicates: tuple[str, ...] = ()


def media_type(request: web.Request) -> str:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()


def decode(raw: bytes, content_type: str) -> Decoded:
    """Decode a JSON or YAML body; anything that is not one is a 400."""
    if content_type in ("", JSON) or content_type.endswith("+json"):
        duplicates: list[str] = []

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            result: dict[str, Any] = {}
            for key, value in items:
                if key in result:
                    duplicates.append(key)
                result[key] = value
            return result

        try:
            value = json.loads(raw or b"null", object_pairs_hook=pairs)
        except (ValueError, RecursionError) as exc:
            raise errors.bad_request(f"the request body is not valid JSON: {exc}") from None
        return Decoded(value, tuple(duplicates))
    if content_type in (YAML, "application/x-yaml", "text/yaml") or content_type.endswith("+yaml"):
        try:
            return Decoded(yaml.safe_load(raw or b"null"))
        except yaml.YAMLError as exc:
            raise errors.bad_request(f"the request body is not valid YAML: {exc}") from None
    raise errors.unsupported_media_type(content_type, [JSON, YAML])


async def read_object(request: web.Request) -> Decoded:
    """The body of a create or update: one JSON or YAML object."""
    decoded = decode(await request.read(), media_type(request))
    if not isinstance(decoded.value, dict):
        raise errors.bad_request("the request body must be a JSON or YAML object")
    return decoded
