"""Header scrubbing for the datasource proxy, both ways.

To the datasource: hop-by-hop headers (and those ``Connection`` names), ``Proxy-*``, the
caller's credentials for the bridge/Grafana and identity headers only the bridge may set are
dropped (CVE-2022-39201, CVE-2022-35957); ``X-Forwarded-*`` are set as Go's ReverseProxy does.
Back to the caller: hop-by-hop headers, ``Set-Cookie`` and ``Location`` (mapped separately) are
dropped, and a datasource's HTML may not run as the bridge's origin (CVE-2022-21702).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Collection
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from bridge.auth import forwardable_headers
from bridge.dsproxy.routes import FORBIDDEN_ROUTE_HEADERS
from bridge.hops import end_to_end
from bridge.identity import Identity
from bridge.provisioning import DataSourceSettings

__all__ = ["custom_header_ok", "downstream_headers", "upstream_headers"]

# Never sent to the datasource: the caller's credentials for the bridge/Grafana, identity
# headers only the bridge may set, and what Grafana clears for CORS reasons.
_DROP_REQUEST: Final = frozenset(
    {
        "authorization",
        "cookie",
        "x-ds-authorization",
        "x-grafana-user",
        "x-grafana-id",
        "x-grafana-org-id",
        "x-grafana-device-id",
        "x-id-token",
        "x-webauth-user",
        "origin",
        "referer",
        "expect",
        "user-agent",
        "content-length",
        "content-encoding",
    }
)
_DROP_RESPONSE: Final = frozenset({"set-cookie", "set-cookie2", "location"})
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _scrubbed(
    headers: CIMultiDictProxy[str], drop: Collection[str], prefixes: tuple[str, ...]
) -> CIMultiDict[str]:
    """``headers`` without hop-by-hop ones, ``Host``, ``drop`` and any starting with one of
    ``prefixes``."""
    return CIMultiDict(end_to_end(headers.items(), drop={"host", *drop}, drop_prefixes=prefixes))


def upstream_headers(
    request: web.Request,
    *,
    identity: Identity,
    datasource: DataSourceSettings,
    user_agent: str,
    send_user_header: bool,
) -> CIMultiDict[str]:
    """What the caller sent that may go on, plus forwarding headers and the datasource's auth.

    Route headers, a route's token and the datasource's custom headers are added later.
    """
    out = _scrubbed(request.headers, _DROP_REQUEST, ("x-forwarded-",))
    # X-Forwarded-*, as Go's ReverseProxy and Grafana's proxyutil set them.
    prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
    peer = request.remote or ""
    if peer:
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Host"] = request.headers.get("X-Forwarded-Host") or request.host
    out["X-Forwarded-Proto"] = request.headers.get("X-Forwarded-Proto") or request.scheme
    out[hdrs.USER_AGENT] = user_agent
    forwarded = forwardable_headers(
        request.headers, identity=identity, json_data=datasource.json_data
    )
    if "Cookie" in forwarded:
        out[hdrs.COOKIE] = forwarded["Cookie"]
    if send_user_header and "X-Grafana-User" in forwarded:
        out["X-Grafana-User"] = forwarded["X-Grafana-User"]
    if datasource.basic_auth:
        password = datasource.secure_json_data.get("basicAuthPassword", "")
        credentials = f"{datasource.basic_auth_user}:{password}".encode()
        out[hdrs.AUTHORIZATION] = "Basic " + base64.b64encode(credentials).decode("ascii")
    ds_auth = request.headers.get("X-DS-Authorization")
    if ds_auth:
        out[hdrs.AUTHORIZATION] = ds_auth
    return out


def custom_header_ok(name: str, value: str) -> bool:
    """Whether a datasource's ``httpHeaderNameN``/``httpHeaderValueN`` may be sent: never one
    that names an identity, framing or connection header (CVE-2022-35957)."""
    lower = name.lower()
    return (
        _HEADER_NAME.fullmatch(name) is not None
        and lower not in FORBIDDEN_ROUTE_HEADERS
        and not lower.startswith("proxy-")
        and "\r" not in value
        and "\n" not in value
    )


def downstream_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The datasource's response headers as the caller may see them (``Location`` excluded)."""
    out = _scrubbed(upstream, _DROP_RESPONSE, ())
    if len(upstream.getall(hdrs.CONTENT_LENGTH, [])) != 1 or hdrs.TRANSFER_ENCODING in upstream:
        out.popall(hdrs.CONTENT_LENGTH, None)
    # CVE-2022-21702: a datasource's HTML must not run as the bridge's origin.
    out["Content-Security-Policy"] = "sandbox"
    out["X-Content-Type-Options"] = "nosniff"
    return out
