"""The ``datasource-proxy`` service type: a reverse proxy to a datasource's own HTTP API.

``/apis/{group}/{version}/namespaces/{ns}/datasources/{uid}/proxy/{path...}`` goes to the
provisioned datasource's URL with Grafana's data-proxy semantics (protocol reference §5): the
first matching plugin.json route decides the role needed, the destination, query parameters,
headers, body and OAuth2 token. Safety rules (peers-and-pitfalls §4.4): the path was
normalised once by the front door and is confined under the destination's path; the caller's
Grafana credentials and cookies never leave; ``Set-Cookie`` never comes back; redirects are
never followed and are passed on only when they stay under the destination; every destination
may be restricted by ``datasource_proxy.allowed_hosts``; an upstream 401 becomes a 400.
Bodies stream both ways. Everything an operator sees is in docs/datasource-proxy.md.

This module is the handler (route, role, token, forwarding, the answer); the destination URL
and its confinement are in ``target.py``, header scrubbing both ways in ``headers.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Histogram
from yarl import URL

from bridge.dsproxy.headers import custom_header_ok, downstream_headers, upstream_headers
from bridge.dsproxy.hosts import allowed, destination, host_key
from bridge.dsproxy.networks import DeniedNetworks, connection_denied
from bridge.dsproxy.routes import ProxyRoute, RoutesError, compile_routes, match_route
from bridge.dsproxy.settings import DatasourceProxySettings
from bridge.dsproxy.target import Target, absolute, build_target, map_location, render
from bridge.dsproxy.templates import TemplateData
from bridge.dsproxy.tokens import TokenCache, TokenEndpointDenied, TokenError, TokenKey
from bridge.provisioning import DataSourceSettings
from bridge.status import StatusError

if TYPE_CHECKING:
    from bridge.handlers.base import Call

__all__ = ["DatasourceLookup", "DatasourceProxy", "RoutesLookup"]

log = logging.getLogger(__name__)

DatasourceLookup = Callable[[int, str, str], DataSourceSettings]
"""``(org_id, uid, plugin_id)`` → the datasource, or ``StatusError(404)``."""
RoutesLookup = Callable[[str], Sequence[Mapping[str, Any]] | None]
"""``plugin_id`` → its plugin.json ``routes``, or None when the plugin is not loaded."""

_NO_AUTO_HEADERS: Final = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE)
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


class _Logged(StatusError):
    """A failure whose details (addresses, upstream errors) were logged where it happened."""


class _TooLarge(Exception):
    """The client's body went over the limit while streaming."""


class _Body:
    """The client's body, streamed to the datasource, counted against the limit."""

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.sent = 0
        self.too_large = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._content.readany()
            if not chunk:
                return
            self.sent += len(chunk)
            if self.sent > self._limit:
                self.too_large = True
                raise _TooLarge
            yield chunk


class DatasourceProxy:
    """One per bridge: the HTTP connection pool, the token cache and the parsed routes."""

    def __init__(
        self,
        settings: DatasourceProxySettings,
        *,
        datasources: DatasourceLookup,
        routes: RoutesLookup,
        user_agent: str,
        max_body_bytes: int,
        tokens: TokenCache | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.tokens = tokens or TokenCache()
        self._datasources = datasources
        self._routes = routes
        self._user_agent = user_agent
        self._max_body = max_body_bytes
        self._allowed = frozenset(settings.allowed_hosts)
        # plugin id → (the raw routes object parsed, the result); compared by identity, so a
        # re-discovered plugin.json is parsed again.
        self._compiled: dict[
            str, tuple[Sequence[Mapping[str, Any]], tuple[ProxyRoute, ...] | RoutesError]
        ] = {}
        # (org, uid) → (the CA bundle it was built from, the context): one per datasource,
        # replaced when the datasource's CA changes.
        self._tls: dict[tuple[int, str], tuple[str, ssl.SSLContext]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._warned: set[tuple[int, str, str]] = set()
        self._requests = Counter(
            "grafana_bridge_datasource_proxy_requests_total",
            "Datasource-proxy requests answered, by plugin and HTTP status code.",
            ["plugin_id", "code"],
            registry=registry,
        )
        self._duration = Histogram(
            "grafana_bridge_datasource_proxy_request_duration_seconds",
            "Time to serve a datasource-proxy request, the answer's body included, by plugin.",
            ["plugin_id"],
            registry=registry,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.settings.max_connections,
                socket_factory=DeniedNetworks(self.settings.denied_networks).socket_factory,
            ),
            # Datasource cookies must not outlive one request or reach another user.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise StatusError(503, "the datasource proxy is not running", retry_after=1.0)
        return self._session

    # -- routes ------------------------------------------------------------------------------

    def routes_for(self, plugin_id: str) -> tuple[ProxyRoute, ...]:
        """The plugin's parsed routes; parsed (and any error logged) once per plugin.json."""
        raw = self._routes(plugin_id)
        if raw is None:
            # Without plugin.json its routes' role checks are unknown: fail closed.
            raise StatusError(
                503, f"plugin {plugin_id!r} is not loaded, so its proxy routes are unknown"
            )
        known = self._compiled.get(plugin_id)
        if known is None or known[0] is not raw:
            try:
                result: tuple[ProxyRoute, ...] | RoutesError = compile_routes(raw)
            except RoutesError as exc:
                log.error("plugin %s: plugin.json routes are unusable: %s", plugin_id, exc)
                result = exc
            known = (raw, result)
            self._compiled[plugin_id] = known
        compiled = known[1]
        if isinstance(compiled, RoutesError):
            raise StatusError(500, f"plugin {plugin_id!r} has invalid proxy routes: {compiled}")
        return compiled

    # -- requests ----------------------------------------------------------------------------

    async def serve(self, call: Call) -> web.StreamResponse:
        started = time.monotonic()
        code = 499  # cancelled: the client left
        try:
            response = await self._serve(call)
            code = response.status
            return response
        except _Logged as exc:
            code = exc.code
            raise
        except StatusError as exc:
            code = exc.code
            level = logging.WARNING if exc.code >= 500 or exc.code == 403 else logging.INFO
            log.log(
                level,
                "datasource proxy: %s %s/proxy/%s for %r in org %d: %d %s",
                call.request.method,
                call.params.get("uid", ""),
                call.params.get("path", ""),
                call.identity.login,
                call.org_id,
                exc.code,
                exc.message,
            )
            raise
        except Exception:
            code = 500
            raise
        finally:
            self._requests.labels(call.plugin_id, str(code)).inc()
            self._duration.labels(call.plugin_id).observe(time.monotonic() - started)

    async def _serve(self, call: Call) -> web.StreamResponse:
        request = call.request
        uid = call.params["uid"]
        proxy_path = call.params.get("path", "")
        datasource = self._datasources(call.org_id, uid, call.plugin_id)
        route = match_route(self.routes_for(call.plugin_id), request.method, proxy_path)
        if route is not None and not route.allows(call.identity):
            raise StatusError(
                403,
                f"plugin proxy route access denied: {route.describe()} needs the "
                f"{route.required_role().value} role, {call.identity.login!r} is "
                f"{call.identity.role.value}",
            )
        if request.content_length is not None and request.content_length > self._max_body:
            raise StatusError(
                413, f"the request body is larger than the limit of {self._max_body} bytes"
            )
        data = TemplateData(datasource.json_data, datasource.secure_json_data)
        raw_query = request.rel_url.raw_query_string
        target = build_target(datasource, route, proxy_path, raw_query, data)
        self._check_allowed(target.url, uid)
        headers = upstream_headers(
            request,
            identity=call.identity,
            datasource=datasource,
            user_agent=self._user_agent,
            send_user_header=self.settings.send_user_header,
        )
        body: bytes | _Body | None = None
        if route is not None:
            self._apply_route_headers(route, data, headers)
            body = self._route_body(route, data)
            token = await self._token(call, datasource, route, data)
            if token:
                headers[hdrs.AUTHORIZATION] = f"Bearer {token}"
        self._apply_datasource_headers(datasource, headers)
        if body is None and request.body_exists:
            if request.content_length is not None and "Content-Encoding" not in request.headers:
                headers[hdrs.CONTENT_LENGTH] = str(request.content_length)
            body = _Body(request.content, self._max_body)
        return await self._forward(
            call, datasource=datasource, target=target, headers=headers, body=body
        )

    def _apply_route_headers(
        self, route: ProxyRoute, data: TemplateData, headers: CIMultiDict[str]
    ) -> None:
        for index, rule in enumerate(route.headers):
            value = render(route, f"headers[{index}]", rule.content, data)
            if "\r" in value or "\n" in value:
                raise StatusError(
                    500, f"{route.describe()} headers[{index}] renders to a line break"
                )
            headers[str(rule.name)] = value

    def _route_body(self, route: ProxyRoute, data: TemplateData) -> bytes | None:
        if route.body is None:
            return None
        rendered = render(route, "body", route.body, data)
        try:
            json.loads(rendered)
        except ValueError:
            raise StatusError(
                500, f"{route.describe()} body is not valid JSON once rendered"
            ) from None
        return rendered.encode()

    async def _token(
        self, call: Call, datasource: DataSourceSettings, route: ProxyRoute, data: TemplateData
    ) -> str | None:
        override = datasource.json_data.get("authenticationType")
        auth_type = override if isinstance(override, str) and override else route.auth_type
        if auth_type in ("azure", "gce", "jwt") or (
            auth_type == "" and route.token_auth is None and route.jwt_token_auth
        ):
            raise StatusError(
                501,
                f"{route.describe()} needs {auth_type or 'jwt'} token authentication, which "
                "the bridge does not implement",
            )
        if auth_type != "":
            # Plugins use jsonData.authenticationType for their own choices too ("keys"...):
            # as in Grafana no token then, logged once per datasource and value.
            if (datasource.org_id, datasource.uid, auth_type) not in self._warned:
                self._warned.add((datasource.org_id, datasource.uid, auth_type))
                log.warning(
                    "datasource %s: authenticationType %r is not a token type; no token sent",
                    datasource.uid,
                    auth_type,
                )
            return None
        token_auth = route.token_auth
        if token_auth is None:
            return None
        url = absolute(
            render(route, "tokenAuth.url", token_auth.url, data),
            f"{route.describe()} tokenAuth.url renders to",
        )
        self._check_allowed(url, datasource.uid)
        params = {
            name: render(route, f"tokenAuth.params.{name}", template, data)
            for name, template in token_auth.params
        }
        key = TokenKey(
            org_id=datasource.org_id,
            uid=datasource.uid,
            datasource_updated_ms=datasource.last_updated_ms,
            route_index=route.index,
            route_path=route.path,
            route_method=route.method,
        )
        try:
            return await self.tokens.get(
                key,
                session=self._require_session(),
                url=url,
                params=params,
                timeout=self.settings.token_timeout,
            )
        except TokenEndpointDenied as exc:
            log.warning("datasource proxy: %s: %s", route.describe(), exc)
            raise _Logged(
                403, f"could not get an access token for {route.describe()}: {exc}"
            ) from None
        except TokenError as exc:
            raise StatusError(
                502, f"could not get an access token for {route.describe()}: {exc}"
            ) from None

    def _apply_datasource_headers(
        self, datasource: DataSourceSettings, headers: CIMultiDict[str]
    ) -> None:
        """The datasource's custom headers (``jsonData.httpHeaderNameN`` with
        ``secureJsonData.httpHeaderValueN``), set last as Grafana's transport middleware does;
        never one that names an identity, framing or connection header (CVE-2022-35957)."""
        data = datasource.json_data
        index = 1
        while isinstance(name := data.get(f"httpHeaderName{index}"), str):
            value = datasource.secure_json_data.get(f"httpHeaderValue{index}", "")
            if not custom_header_ok(name.strip(), value):
                warned = (datasource.org_id, datasource.uid, f"header:{name.strip().lower()}")
                if warned not in self._warned:
                    self._warned.add(warned)
                    log.warning(
                        "datasource %s: custom header %r (httpHeaderName%d) is not sent: it "
                        "may not be set by a datasource",
                        datasource.uid,
                        name,
                        index,
                    )
            else:
                headers[name.strip()] = value
            index += 1

    def _check_allowed(self, url: URL, uid: str) -> None:
        if self._allowed and not allowed(url, self._allowed):
            host, port = destination(url)
            raise StatusError(
                403,
                f"target URL is not a valid target: {host_key(host, port)} is not in "
                f"datasource_proxy.allowed_hosts (datasource {uid!r})",
            )

    def _ssl(self, datasource: DataSourceSettings) -> ssl.SSLContext | bool:
        data = datasource.json_data
        if data.get("tlsSkipVerify") is True:
            return False
        ca = datasource.secure_json_data.get("tlsCACert", "")
        if data.get("tlsAuthWithCACert") is True and ca:
            key = (datasource.org_id, datasource.uid)
            known = self._tls.get(key)
            if known is not None and known[0] == ca:
                return known[1]
            try:
                context = ssl.create_default_context(cadata=ca)
            except (ssl.SSLError, ValueError):
                raise StatusError(
                    502, f"datasource {datasource.uid!r} has an unusable tlsCACert"
                ) from None
            self._tls[key] = (ca, context)
            return context
        return True

    async def _forward(
        self,
        call: Call,
        *,
        datasource: DataSourceSettings,
        target: Target,
        headers: CIMultiDict[str],
        body: bytes | _Body | None,
    ) -> web.StreamResponse:
        request = call.request
        settings = self.settings
        session = self._require_session()
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.dial_timeout,
            sock_connect=settings.dial_timeout,
            sock_read=settings.timeout,
        )
        payload: bytes | AsyncIterator[bytes] | None = (
            body.chunks() if isinstance(body, _Body) else body
        )
        uid = datasource.uid
        try:
            upstream = await session.request(
                request.method,
                target.url,
                headers=headers,
                data=payload,
                allow_redirects=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                timeout=timeout,
                ssl=self._ssl(datasource),
            )
        except aiohttp.ConnectionTimeoutError:
            raise StatusError(
                504,
                f"datasource {uid!r} could not be connected to within {settings.dial_timeout:g}s",
            ) from None
        except TimeoutError:
            raise StatusError(
                504, f"datasource {uid!r} did not answer within {settings.timeout:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(body, _Body) and body.too_large:
                raise StatusError(
                    413, f"the request body is larger than the limit of {self._max_body} bytes"
                ) from None
            if connection_denied(exc):
                log.warning(
                    "datasource proxy: %s %s: datasource %s: %s leads only to addresses in "
                    "datasource_proxy.denied_networks",
                    request.method,
                    request.path,
                    uid,
                    target.url.host,
                )
                raise _Logged(
                    403,
                    f"datasource {uid!r}: {target.url.host} leads only to addresses the "
                    "datasource proxy may not connect to (datasource_proxy.denied_networks)",
                ) from None
            log.warning(
                "datasource proxy: %s %s: datasource %s at %s could not be reached: %s: %s",
                request.method,
                request.path,
                uid,
                target.url.origin(),
                type(exc).__name__,
                exc,
            )
            raise _Logged(502, f"datasource {uid!r} could not be reached") from None
        complete = False
        try:
            if upstream.status == 401:
                raise StatusError(400, "Authentication to data source failed")
            location = None
            if hdrs.LOCATION in upstream.headers:
                location = self._location(call, target, upstream)
            length = upstream.content_length
            limit = settings.response_limit_bytes
            if limit and length is not None and length > limit:
                raise StatusError(502, f"datasource {uid!r} answered with more than {limit} bytes")
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=downstream_headers(upstream.headers),
            )
            if location is not None:
                response.headers[hdrs.LOCATION] = location
            try:
                await response.prepare(request)
            except ConnectionError:
                return response  # the client left; nobody reads an answer
            with_body = request.method != "HEAD" and upstream.status not in (204, 304)
            complete = await self._copy(request, upstream, response, uid, with_body=with_body)
            if complete:
                # The client may have left after the last byte; nothing may be sent now.
                with contextlib.suppress(ConnectionError):
                    await response.write_eof()
            return response
        finally:
            if complete:
                upstream.release()
            else:
                upstream.close()

    async def _copy(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        uid: str,
        *,
        with_body: bool,
    ) -> bool:
        if not with_body:
            return True
        limit = self.settings.response_limit_bytes
        received = 0
        try:
            async for chunk in upstream.content.iter_any():
                received += len(chunk)
                if limit and received > limit:
                    log.warning(
                        "datasource %s: answer went over response_limit_bytes (%d); cut off",
                        uid,
                        limit,
                    )
                    _drop(request)
                    return False
                try:
                    await response.write(chunk)
                except ConnectionError:
                    return False  # the client left

        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # The status line is out: closing the connection is the only signal left.
            log.warning("datasource %s: answer broke off: %s", uid, type(exc).__name__)
            _drop(request)
            return False
        return True

    def _location(self, call: Call, target: Target, upstream: aiohttp.ClientResponse) -> str | None:
        """``Location`` mapped onto the bridge when it stays under the destination.

        Elsewhere: a redirect is a 502 (never followed, never passed on); on any other
        status (``201 Created``...) the header is dropped.
        """
        location = upstream.headers[hdrs.LOCATION]
        segments = call.request.rel_url.raw_path.split("/")
        # "", apis, group, version, namespaces, ns, datasources, uid, proxy
        mapped = map_location(target, location, "/".join(segments[:9]))
        if mapped is not None or upstream.status not in _REDIRECTS:
            return mapped
        log.warning(
            "datasource proxy: %s %s: datasource %s redirected outside its URL to %s; "
            "not followed (502)",
            call.request.method,
            call.request.path,
            call.params.get("uid", ""),
            location,
        )
        raise _Logged(
            502,
            "the datasource redirected to a location outside its URL; redirects are not followed",
        )


# -- helpers ---------------------------------------------------------------------------------


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()
