"""plugin.json ``routes``: parsed once per plugin.json, matched and authorised per request.

Matching follows Grafana's data proxy (protocol reference §5): routes in file order, the first
whose method is empty, ``*`` or the request's method and whose cleaned ``path`` is a plain
string prefix of the proxied path wins (so ``api`` also matches ``apiv2``, as upstream). The
path matched is the one the front door normalised once; authorisation uses the same value.

A plugin.json whose routes cannot all be parsed makes every proxy request for that plugin fail
with a 500 naming the first problem: skipping a broken route could skip its ``reqRole``.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from bridge.dsproxy.templates import Template, TemplateError
from bridge.identity import Identity, OrgRole

__all__ = ["HeaderRule", "ProxyRoute", "RoutesError", "TokenAuth", "compile_routes", "match_route"]

# Headers a route may not set: identity, framing and connection headers (CVE-2022-35957: a
# configured header must never be able to claim an identity for the next hop).
FORBIDDEN_ROUTE_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "cookie",
        "x-grafana-user",
        "x-grafana-id",
        "x-grafana-org-id",
        "x-webauth-user",
        "x-id-token",
        "x-ds-authorization",
    }
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ROLES = {"Viewer": OrgRole.VIEWER, "Editor": OrgRole.EDITOR, "Admin": OrgRole.ADMIN}
_TOKEN_AUTH_TYPES: Final = frozenset({"", "azure", "gce", "jwt"})


class RoutesError(ValueError):
    """plugin.json ``routes`` that cannot be used; the message names the route and field."""


@dataclass(frozen=True, slots=True)
class HeaderRule:
    name: Template | str  # urlParams render their names; headers do not (as in Grafana)
    content: Template


@dataclass(frozen=True, slots=True)
class TokenAuth:
    url: Template
    params: tuple[tuple[str, Template], ...]
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """One route of plugin.json, validated, with its templates parsed."""

    index: int
    path: str  # cleaned: no leading "/", no ".." parts
    method: str  # "" or "*" match any method
    req_role: OrgRole | None
    req_action: str
    url: Template | None
    url_params: tuple[HeaderRule, ...]
    headers: tuple[HeaderRule, ...]
    body: Template | None
    auth_type: str
    token_auth: TokenAuth | None
    jwt_token_auth: bool

    def describe(self) -> str:
        return f"route {self.index} ({self.method or '*'} {self.path or '/'})"

    def matches(self, method: str, proxy_path: str) -> bool:
        """``proxy_path`` as :func:`clean_relative_path` gives it."""
        if self.method not in ("", "*") and self.method != method:
            return False
        return proxy_path.startswith(self.path)

    def required_role(self) -> OrgRole:
        """The least org role the route needs.

        ``reqAction`` names an RBAC action, which the bridge cannot evaluate: the route then
        needs its ``reqRole`` if it has one, else Admin (fail closed, documented).
        """
        if self.req_role is not None:
            return self.req_role
        return OrgRole.ADMIN if self.req_action else OrgRole.VIEWER

    def allows(self, identity: Identity) -> bool:
        # Grafana's HasRole: a server admin has every org role.
        return identity.is_server_admin or identity.role >= self.required_role()


def clean_relative_path(path: str) -> str:
    """Grafana's ``CleanRelativePath``: cleaned as if rooted, then without the leading ``/``.

    ``..`` cannot climb above the root, ``//`` and ``.`` collapse, a trailing ``/`` goes.
    """
    return posixpath.normpath("/" + path).lstrip("/")


def compile_routes(raw: Sequence[Mapping[str, Any]]) -> tuple[ProxyRoute, ...]:
    """Parse every route; raise :class:`RoutesError` for the first unusable one."""
    return tuple(_compile(index, item) for index, item in enumerate(raw))


def match_route(routes: Sequence[ProxyRoute], method: str, proxy_path: str) -> ProxyRoute | None:
    cleaned = clean_relative_path(proxy_path)
    for route in routes:
        if route.matches(method, cleaned):
            return route
    return None


def _compile(index: int, item: Mapping[str, Any]) -> ProxyRoute:
    where = f"routes[{index}]"

    def text(key: str) -> str:
        value = item.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise RoutesError(f"{where}.{key} must be a string")
        return value

    def template(value: Any, key: str) -> Template:
        if not isinstance(value, str):
            raise RoutesError(f"{where}.{key} must be a string")
        try:
            return Template.parse(value)
        except TemplateError as exc:
            raise RoutesError(f"{where}.{key}: {exc}") from None

    role_name = text("reqRole")
    req_role: OrgRole | None = None
    if role_name:
        req_role = _ROLES.get(role_name)
        if req_role is None:
            raise RoutesError(f"{where}.reqRole must be Viewer, Editor or Admin, got {role_name!r}")
    url = text("url")
    url_params = tuple(
        HeaderRule(
            name=template(entry.get("name"), f"urlParams[{i}].name"),
            content=template(entry.get("content", ""), f"urlParams[{i}].content"),
        )
        for i, entry in enumerate(_objects(item.get("urlParams"), f"{where}.urlParams"))
    )
    headers: list[HeaderRule] = []
    for i, entry in enumerate(_objects(item.get("headers"), f"{where}.headers")):
        name = entry.get("name")
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise RoutesError(f"{where}.headers[{i}].name must be an HTTP header name")
        if name.lower() in FORBIDDEN_ROUTE_HEADERS or name.lower().startswith("proxy-"):
            raise RoutesError(f"{where}.headers[{i}]: a route may not set {name}")
        headers.append(
            HeaderRule(
                name=name, content=template(entry.get("content", ""), f"headers[{i}].content")
            )
        )
    body: Template | None = None
    if item.get("body") is not None:
        # The raw JSON text is the template, as Grafana renders the json.RawMessage.
        body = template(json.dumps(item["body"]), "body")
    auth_type = text("authType")
    if auth_type not in _TOKEN_AUTH_TYPES:
        raise RoutesError(f"{where}.authType {auth_type!r} is not one of azure, gce, jwt")
    token_auth: TokenAuth | None = None
    raw_token = item.get("tokenAuth")
    if raw_token is not None:
        if not isinstance(raw_token, Mapping):
            raise RoutesError(f"{where}.tokenAuth must be an object")
        params = raw_token.get("params")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise RoutesError(f"{where}.tokenAuth.params must be an object")
        scopes = raw_token.get("scopes")
        scopes = [] if scopes is None else scopes
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise RoutesError(f"{where}.tokenAuth.scopes must be an array of strings")
        token_auth = TokenAuth(
            url=template(raw_token.get("url"), "tokenAuth.url"),
            params=tuple(
                (str(k), template(v, f"tokenAuth.params.{k}")) for k, v in sorted(params.items())
            ),
            scopes=tuple(scopes),
        )
    return ProxyRoute(
        index=index,
        path=clean_relative_path(text("path")),
        method=text("method"),
        req_role=req_role,
        req_action=text("reqAction"),
        url=template(url, "url") if url else None,
        url_params=url_params,
        headers=tuple(headers),
        body=body,
        auth_type=auth_type,
        token_auth=token_auth,
        jwt_token_auth=item.get("jwtTokenAuth") is not None,
    )


def _objects(value: Any, where: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise RoutesError(f"{where} must be an array of objects")
    return value
