"""The datasource proxy's parts on their own: templates, routes, hosts, the token cache.

In-process, table-driven; the token cache talks to a real HTTP token endpoint on a loopback
port with an injected clock. The end-to-end behaviour is in test_datasource_proxy.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from yarl import URL

from bridge.config import ConfigError, load_config
from bridge.dsproxy import (
    DatasourceProxy,
    DatasourceProxySettings,
    RoutesError,
    Template,
    TemplateData,
    TemplateError,
    TokenCache,
    TokenError,
    TokenKey,
    compile_routes,
    match_route,
)
from bridge.dsproxy.hosts import allowed, canonical_host_entry
from bridge.dsproxy.routes import clean_relative_path
from bridge.identity import Identity, OrgRole
from bridge.status import StatusError
from tests.bridge.conftest import serving

DATA = TemplateData(
    json_data={
        "url": "http://ds.example",
        "tenant": "t1",
        "n": 3,
        "f": 1.5,
        "big": 1e21,
        "yes": True,
        "none": None,
        "list": [1, "a", None],
        "obj": {"b": 2, "a": {"x": "y"}},
    },
    secure_json_data={"token": "s3cret"},
)

# -- templates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "rendered"),
    [
        ("plain text", "plain text"),
        ("{{.JsonData.url}}/api", "http://ds.example/api"),
        ("Bearer {{.SecureJsonData.token}}", "Bearer s3cret"),
        ("{{ .JsonData.tenant }}", "t1"),
        ("{{.JsonData.obj.a.x}}", "y"),
        ("{{.JsonData.missing}}", "<no value>"),
        ("{{.SecureJsonData.missing}}", "<no value>"),
        ("{{.JsonData.none}}", "<no value>"),
        ("[{{orEmpty .JsonData.missing}}]", "[]"),
        ("[{{orEmpty .JsonData.none}}]", "[]"),
        ("[{{orEmpty .SecureJsonData.missing}}]", "[]"),
        ("{{orEmpty .JsonData.tenant}}", "t1"),
        ("{{.JsonData.missing | orEmpty}}", ""),
        ("{{.JsonData.n}} {{.JsonData.f}} {{.JsonData.big}}", "3 1.5 1e+21"),
        ("{{.JsonData.yes}}", "true"),
        ("{{.JsonData.list}}", "[1 a <nil>]"),
        ("{{.JsonData.obj}}", "map[a:map[x:y] b:2]"),
        ("a  {{- .JsonData.tenant -}}  b", "at1b"),
        ("}} is fine as text", "}} is fine as text"),
    ],
)
def test_template_renders(source: str, rendered: str) -> None:
    assert Template.parse(source).render(DATA) == rendered


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{.JsonData}}", "expected .JsonData.<key>"),
        ("{{.Other.x}}", "expected .JsonData.<key>"),
        ('{{printf "%s" .JsonData.x}}', "unsupported template action"),
        ("{{.JsonData.x | printf}}", "unsupported template action"),
        ('{{index .JsonData "a-b"}}', "unsupported template action"),
        ("{{range .JsonData.list}}x{{end}}", "unsupported template action"),
        ("{{/* comment */}}", "unsupported template action"),
        ("{{$x := 1}}", "unsupported template action"),
        ("{{.JsonData.a-b}}", "expected .JsonData.<key>"),
        ("{{.SecureJsonData.a.b}}", "secureJsonData values are strings"),
        ("{{.JsonData.x", "unclosed"),
        ("{{}}", "unsupported template action"),
    ],
)
def test_template_refuses(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        Template.parse(source)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{.JsonData.tenant.x}}", "jsonData.tenant is a string, not an object"),
        ("{{.JsonData.missing.x}}", "jsonData.missing is missing"),
        ("{{.JsonData.list.x}}", "jsonData.list is an array"),
    ],
)
def test_template_render_errors(source: str, message: str) -> None:
    template = Template.parse(source)
    with pytest.raises(TemplateError, match=message):
        template.render(DATA)


# -- routes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"path": "a", "reqRole": "Superuser"}, "reqRole must be Viewer, Editor or Admin"),
        ({"path": 3}, "routes\\[0\\].path must be a string"),
        ({"headers": [{"name": "Cookie", "content": "x"}]}, "may not set Cookie"),
        ({"headers": [{"name": "X-Grafana-User", "content": "x"}]}, "may not set"),
        ({"headers": [{"name": "Proxy-Authorization", "content": "x"}]}, "may not set"),
        ({"headers": [{"name": "bad name", "content": "x"}]}, "must be an HTTP header name"),
        ({"headers": [{"name": "X", "content": "{{.Foo}}"}]}, "headers\\[0\\].content"),
        ({"url": '{{env "HOME"}}'}, "routes\\[0\\].url: unsupported"),
        ({"urlParams": {"name": "x"}}, "urlParams must be an array of objects"),
        ({"tokenAuth": {"url": "x", "params": []}}, "tokenAuth.params must be an object"),
        ({"tokenAuth": {"url": "x", "params": {"a": "{{.X}}"}}}, "tokenAuth.params.a"),
        ({"authType": "kerberos"}, "authType 'kerberos'"),
        ({"body": {"a": "{{call .JsonData.f}}"}}, "routes\\[0\\].body"),
    ],
)
def test_routes_refused(route: Mapping[str, Any], message: str) -> None:
    with pytest.raises(RoutesError, match=message):
        compile_routes([route])


ROUTES = compile_routes(
    [
        {"path": "api/v1", "method": "GET", "reqRole": "Editor"},
        {"path": "/api/", "method": "*"},
        {"path": "../up", "method": "POST"},
        {"path": ""},
    ]
)


@pytest.mark.parametrize(
    ("method", "path", "index"),
    [
        ("GET", "api/v1/x", 0),
        ("GET", "api/v1", 0),
        ("GET", "api/v1x", 0),  # plain string prefix, as Grafana
        ("POST", "api/v1/x", 1),  # method mismatch: next route
        ("GET", "api", 1),
        ("GET", "api/", 1),
        ("POST", "up/x", 2),  # "../up" cleans to "up"
        ("GET", "up/x", 3),  # the empty path matches everything
    ],
)
def test_route_matching(method: str, path: str, index: int) -> None:
    route = match_route(ROUTES, method, path)
    assert route is not None and route.index == index


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [("", ""), ("/", ""), ("api/", "api"), ("//a//b", "a/b"), ("../../a", "a"), ("a/./b", "a/b")],
)
def test_clean_relative_path(path: str, cleaned: str) -> None:
    assert clean_relative_path(path) == cleaned


def identity(role: OrgRole, *, server_admin: bool = False) -> Identity:
    return Identity(
        login="u", name="u", email="", org_id=1, role=role, is_server_admin=server_admin
    )


def test_route_roles() -> None:
    editor_route, open_route = ROUTES[0], ROUTES[1]
    assert not editor_route.allows(identity(OrgRole.VIEWER))
    assert editor_route.allows(identity(OrgRole.EDITOR))
    assert editor_route.allows(identity(OrgRole.ADMIN))
    assert editor_route.allows(identity(OrgRole.VIEWER, server_admin=True))  # Grafana's HasRole
    assert open_route.allows(identity(OrgRole.VIEWER))
    (action,) = compile_routes([{"path": "x", "reqAction": "datasources:write"}])
    assert not action.allows(identity(OrgRole.EDITOR))
    assert action.allows(identity(OrgRole.ADMIN))


# -- hosts and settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("Example.COM", "example.com"),
        ("example.com.:8080", "example.com:8080"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("[::1]:9090", "[::1]:9090"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_allowed_host_entries(entry: str, canonical: str) -> None:
    assert canonical_host_entry(entry) == canonical


@pytest.mark.parametrize("entry", ["", "http://x", "x:0", "x:port", "a@b", "[::1"])
def test_allowed_host_entries_refused(entry: str) -> None:
    with pytest.raises(ValueError, match=r"host|port"):
        canonical_host_entry(entry)


@pytest.mark.parametrize(
    ("url", "entries", "ok"),
    [
        ("http://EXAMPLE.com/x", {"example.com"}, True),
        ("http://example.com/x", {"example.com:80"}, True),
        ("https://example.com/x", {"example.com:80"}, False),
        ("http://example.com:8080/", {"example.com:80"}, False),
        ("http://xn--bcher-kva.example/", {"xn--bcher-kva.example"}, True),
        ("http://bücher.example/", {"xn--bcher-kva.example"}, True),
        ("http://[::1]:9090/", {"[::1]:9090"}, True),
        ("http://evil.example/", {"example.com"}, False),
        # IDNA 2008, as the connection is made: "straße.de" is not "strasse.de" (CVE-2023-4399)
        ("http://straße.de/", {"strasse.de"}, False),
        ("http://straße.de/", {canonical_host_entry("straße.de")}, True),
        ("http://xn--strae-oqa.de/", {canonical_host_entry("straße.de")}, True),
        ("http://strasse.de/", {canonical_host_entry("straße.de")}, False),
    ],
)
def test_allow_list(url: str, entries: set[str], ok: bool) -> None:
    assert allowed(URL(url), frozenset(entries)) is ok


def test_settings_from_config_and_environment() -> None:
    config = load_config(
        environ={
            "BRIDGE_DATASOURCE_PROXY__TIMEOUT": "5",
            "BRIDGE_DATASOURCE_PROXY__ALLOWED_HOSTS": "[Grafana.Example:3000, db]",
        }
    )
    assert config.datasource_proxy.timeout == 5.0
    assert config.datasource_proxy.allowed_hosts == ("grafana.example:3000", "db")
    assert config.datasource_proxy.token_timeout == 10.0
    with pytest.raises(ConfigError, match=r"datasource_proxy\.allowed_hosts"):
        load_config(environ={}, overrides={"datasource_proxy.allowed_hosts": ["http://x/"]})
    with pytest.raises(ConfigError, match=r"datasource_proxy\.timeout"):
        load_config(environ={}, overrides={"datasource_proxy.timeout": 0})


# -- broken plugin.json routes -----------------------------------------------------------------


def test_broken_routes_fail_closed_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    routes: dict[str, tuple[Mapping[str, Any], ...]] = {
        "good": ({"path": "a", "reqRole": "Admin"},),
        "bad": ({"path": "a", "reqRole": "Admin"}, {"path": "b", "reqRole": "Root"}),
    }
    proxy = DatasourceProxy(
        DatasourceProxySettings(),
        datasources=lambda org, uid, plugin: pytest.fail("not reached"),
        routes=routes.get,
        user_agent="Grafana/test",
        max_body_bytes=1024,
    )
    assert [r.path for r in proxy.routes_for("good")] == ["a"]
    with caplog.at_level(logging.ERROR, logger="bridge.dsproxy.proxy"):
        for _ in range(3):
            with pytest.raises(StatusError) as failure:
                proxy.routes_for("bad")
            assert failure.value.code == 500
            assert "routes[1].reqRole" in failure.value.message
    assert len([r for r in caplog.records if "unusable" in r.getMessage()]) == 1
    # A re-discovered plugin.json (a new routes object) is parsed again.
    routes["bad"] = ({"path": "b", "reqRole": "Editor"},)
    assert [r.path for r in proxy.routes_for("bad")] == ["b"]
    with pytest.raises(StatusError) as failure:
        proxy.routes_for("not-loaded")
    assert failure.value.code == 503


# -- the token cache against a real token endpoint ----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class TokenEndpoint:
    def __init__(self) -> None:
        self.answers: list[tuple[int, Any]] = []
        self.forms: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.forms.append(dict(await request.post()))  # type: ignore[arg-type]
        status, body = self.answers.pop(0)
        if isinstance(body, bytes):
            return web.Response(status=status, body=body)
        return web.json_response(body, status=status)


@pytest_asyncio.fixture
async def endpoint() -> AsyncIterator[tuple[TokenEndpoint, URL, aiohttp.ClientSession]]:
    token = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/token", token.handle)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        yield token, URL(url + "/token"), session


KEY = TokenKey(
    org_id=1, uid="ds", datasource_updated_ms=1, route_index=0, route_path="a", route_method=""
)


async def test_token_cached_until_ten_seconds_before_expiry(
    endpoint: tuple[TokenEndpoint, URL, aiohttp.ClientSession],
) -> None:
    token, url, session = endpoint
    clock = Clock()
    cache = TokenCache(clock=clock)
    token.answers = [
        (200, {"access_token": "one", "expires_in": 60}),
        (200, {"access_token": "two", "expires_on": str(int(clock.now) + 3600)}),
    ]
    get = dict(session=session, url=url, params={"client_id": "c"}, timeout=5.0)
    assert await cache.get(KEY, **get) == "one"  # type: ignore[arg-type]
    clock.now += 49  # 11 s left
    assert await cache.get(KEY, **get) == "one"  # type: ignore[arg-type]
    clock.now += 2  # 9 s left: refreshed
    assert await cache.get(KEY, **get) == "two"  # type: ignore[arg-type]
    assert token.forms == [{"client_id": "c"}, {"client_id": "c"}]
    other_route = TokenKey(1, "ds", 1, 1, "b", "")
    token.answers = [(200, {"access_token": "three", "expires_in": "3599"})]
    assert await cache.get(other_route, **get) == "three"  # type: ignore[arg-type]
    # The datasource changed: a new key, and the old version's tokens are dropped.
    token.answers = [(200, {"access_token": "four", "expires_in": 3600})]
    assert await cache.get(TokenKey(1, "ds", 2, 0, "a", ""), **get) == "four"  # type: ignore[arg-type]
    assert len(cache) == 1
    assert cache.fetches == 4


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, {"error": "invalid_client"}, "answered 400"),
        (200, b"not json", "not JSON"),
        (200, [1], "not a JSON object"),
        (200, {"token": "x"}, "no access_token"),
    ],
)
async def test_token_failures(
    endpoint: tuple[TokenEndpoint, URL, aiohttp.ClientSession],
    status: int,
    body: Any,
    message: str,
) -> None:
    token, url, session = endpoint
    token.answers = [(status, body)]
    with pytest.raises(TokenError, match=message):
        await TokenCache().get(KEY, session=session, url=url, params={}, timeout=5.0)


async def test_token_endpoint_unreachable() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenError, match="could not be reached"):
            await TokenCache().get(
                KEY, session=session, url=URL("http://127.0.0.1:9/token"), params={}, timeout=5.0
            )


async def test_requests_waiting_for_a_failed_fetch_share_its_failure(
    endpoint: tuple[TokenEndpoint, URL, aiohttp.ClientSession],
) -> None:
    """Five requests need the token while the endpoint is failing: one fetch, five errors (not
    five fetches one after another, each waiting up to token_timeout). The failure is not
    remembered: the next request tries again."""
    token, url, session = endpoint
    token.answers = [(503, {"error": "unavailable"})]
    cache = TokenCache()
    get = dict(session=session, url=url, params={}, timeout=5.0)
    results = await asyncio.gather(
        *(cache.get(KEY, **get) for _ in range(5)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert [str(r) for r in results] == ["the token endpoint answered 503"] * 5
    assert all(isinstance(r, TokenError) for r in results)
    assert cache.fetches == 1
    token.answers = [(200, {"access_token": "back", "expires_in": 3600})]
    assert await cache.get(KEY, **get) == "back"  # type: ignore[arg-type]
    assert cache.fetches == 2
