"""Where a datasource-proxy request goes: the destination URL, confined under the datasource's.

The proxied path arrives normalised once by the front door (no ``.``/``..`` segments, no
``//``, no encoded ``/`` or ``\\``). Here it is joined under the destination's path segment by
segment, each segment percent-encoded again, and checked to stay there. A segment that is a dot
segment once its ``;parameters`` are cut (``..;``, ``.;x``) is refused as well: Tomcat, Jetty
and Spring read ``/a/..;/b`` as ``/b``, which would climb out of a route the role check passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlencode

from yarl import URL

from bridge.dsproxy.hosts import canonical_host_entry, destination
from bridge.dsproxy.routes import ProxyRoute
from bridge.dsproxy.templates import Template, TemplateData, TemplateError
from bridge.provisioning import DataSourceSettings
from bridge.status import StatusError

__all__ = ["Target", "absolute", "build_target", "map_location", "render"]

# RFC 3986 pchar minus "/" (segments are quoted one at a time).
_SEGMENT_SAFE: Final = "!$&'()*+,;=:@-._~"


@dataclass(frozen=True, slots=True)
class Target:
    url: URL
    base: URL  # the destination's own URL; url's path is confined under base's
    route_prefix: str  # the route path the proxy path lost on the way (redirect mapping)


def render(route: ProxyRoute, what: str, template: Template, data: TemplateData) -> str:
    try:
        return template.render(data)
    except TemplateError as exc:
        raise StatusError(500, f"{route.describe()} {what}: {exc}") from None


def absolute(text: str, what: str) -> URL:
    """``text`` as an absolute http(s) URL with a valid host, else a 502 saying ``what``."""
    try:
        url = URL(text)
    except ValueError:
        raise StatusError(502, f"{what} an invalid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise StatusError(502, f"{what} {text!r}, not an absolute http(s) URL")
    try:
        canonical_host_entry(url.host)
    except ValueError:
        raise StatusError(502, f"{what} a URL with an invalid host") from None
    return url


def build_target(
    datasource: DataSourceSettings,
    route: ProxyRoute | None,
    proxy_path: str,
    raw_query: str,
    data: TemplateData,
) -> Target:
    """The URL for ``proxy_path``: under the route's ``url`` when it has one (the route's path
    cut off, as Grafana's ``ApplyRoute``), else under the datasource's URL."""
    if any(_dot_segment(segment) for segment in proxy_path.split("/")):
        raise StatusError(400, "the proxied path has a . or .. segment with path parameters (;)")
    rest = proxy_path
    route_prefix = ""
    if route is not None and route.url is not None:
        base = absolute(render(route, "url", route.url, data), f"{route.describe()} url renders to")
        rest = proxy_path[len(route.path) :] if proxy_path.startswith(route.path) else ""
        route_prefix = route.path
    else:
        if not datasource.url.strip():
            raise StatusError(502, f"datasource {datasource.uid!r} has no URL to proxy to")
        base = absolute(datasource.url.strip(), f"datasource {datasource.uid!r} has URL")
    path = _join(base.raw_path, _encode_path(rest))
    if not confined(path, base.raw_path):
        raise StatusError(400, "the proxied path leaves the datasource's URL")
    query = raw_query
    if route is not None and route.url_params:
        query = _route_query(route, raw_query, data)
    # host[:port] as the URL spells it: IPv6 literals keep their brackets, userinfo is dropped.
    url = URL.build(
        scheme=base.scheme,
        authority=base.host_port_subcomponent or "",
        path=path,
        query_string=query,
        encoded=True,
    )
    return Target(url=url, base=base, route_prefix=route_prefix)


def _route_query(route: ProxyRoute, raw_query: str, data: TemplateData) -> str:
    params = parse_qsl(raw_query, keep_blank_values=True)
    added: list[tuple[str, str]] = []
    for index, rule in enumerate(route.url_params):
        where = f"urlParams[{index}]"
        name = rule.name if isinstance(rule.name, str) else render(route, where, rule.name, data)
        added.append((name, render(route, where, rule.content, data)))
    # A route's parameter replaces the caller's of the same name: an extra ?tenant= from
    # the caller must not be able to sit next to (or before) the configured one.
    names = {name for name, _ in added}
    merged = [(k, v) for k, v in params if k not in names] + added
    merged.sort(key=lambda kv: kv[0])  # Go's url.Values.Encode sorts by key
    return urlencode(merged, quote_via=quote)


def map_location(target: Target, location: str, bridge_prefix: str) -> str | None:
    """``location`` (resolved against the request's URL) as a path under ``bridge_prefix``
    (``.../datasources/{uid}/proxy``), or None when it leaves the destination."""
    try:
        resolved = target.url.join(URL(location))
    except ValueError:
        return None
    base = target.base
    try:
        same_host = destination(resolved) == destination(base)
    except ValueError:  # a host name that is not even valid IDNA
        return None
    if (
        resolved.scheme != base.scheme
        or not same_host
        or not confined(resolved.raw_path, base.raw_path)
    ):
        return None
    rel = resolved.raw_path[len(base.raw_path.rstrip("/")) :].lstrip("/")
    prefix = target.route_prefix
    mapped = f"{prefix}/{rel}" if prefix and rel else (prefix or rel)
    query = f"?{resolved.raw_query_string}" if resolved.raw_query_string else ""
    return f"{bridge_prefix}/{mapped}{query}"


def _dot_segment(segment: str) -> bool:
    """``.`` or ``..``, also with ``;parameters`` (``..;x``), as servers that strip them see it."""
    return segment.split(";", 1)[0] in (".", "..")


def _encode_path(path: str) -> str:
    return "/".join(quote(segment, safe=_SEGMENT_SAFE) for segment in path.split("/"))


def _join(base: str, rest: str) -> str:
    """Grafana's ``JoinURLFragments``: exactly one ``/`` between the two, ``base`` if no rest."""
    if not rest:
        return base or "/"
    if base.endswith("/") and rest.startswith("/"):
        return base + rest[1:]
    if not base.endswith("/") and not rest.startswith("/"):
        return base + "/" + rest
    return base + rest


def confined(path: str, base: str) -> bool:
    """Whether the encoded ``path`` stays under ``base``, with no dot segment (``..;`` and
    ``%2e%2e`` too: a ``Location`` header is not normalised by anyone before this)."""
    stem = base.rstrip("/")
    if not (path == stem or path.startswith(stem + "/") or (not stem and path.startswith("/"))):
        return False
    return not any(_dot_segment(unquote(segment)) for segment in path.split("/"))
