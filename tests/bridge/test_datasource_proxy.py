"""The ``datasource-proxy`` service type end to end over real HTTP.

A bridge with the Python fixture plugin (its own plugin.json routes) and a copy of it whose
plugin.json holds every route form (tests/bridge/dsproxy_scene.py), in front of a real aiohttp
server standing in for the datasource's HTTP API and a token endpoint. One row per behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.bridge.conftest import (
    PY_GROUP,
    assert_status,
    auth_headers,
    bridge_config,
    dataplane_service,
    datasource,
    front_door,
    sample,
    serving,
    write_datasources,
    write_manifest,
)
from tests.bridge.dsproxy_scene import (
    MAX_BODY,
    PROXY,
    PROXY_GROUP,
    RESPONSE_LIMIT,
    ProxyScene,
    StandInDatasource,
    proxy_scene,
    write_plugin,
)
from tests.bridge.test_delegate import listener_that_never_accepts

pytestmark = pytest.mark.asyncio(loop_scope="module")

BASE = f"/apis/{PROXY_GROUP}/v0alpha1/namespaces/default/datasources"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scene(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProxyScene]:
    async with proxy_scene(tmp_path_factory.mktemp("dsproxy")) as running:
        yield running


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- routes and templates ----------------------------------------------------------------------


async def test_route_renders_every_template_form(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "api/things?x=1&tenant=evil", user="viewer")
    assert answer.status == 200, answer.text
    seen = scene.datasource.seen[-1]
    assert seen.raw_path.startswith("/upstream-api/things?")
    # urlParams: added, sorted by key as Go encodes them; the caller's tenant is replaced.
    assert seen.query == [("key", "s3cret"), ("tenant", "t1"), ("x", "1")]
    h = seen.headers
    assert h["X-Api-Key"] == "s3cret"
    assert h["X-Region"] == "eu"  # nested jsonData object
    assert h["X-Missing"] == "<no value>"  # Go's rendering of a missing key
    assert h["X-Or-Empty"] == "[]"
    assert h["X-Secret-Or-Empty"] == "[]"
    assert h["X-Values"] == "3 true [1 two]"
    assert h["X-Trimmed"] == "at1b"
    assert h["Authorization"] == basic("bob", "pw")  # datasource basic auth
    assert h["User-Agent"].startswith("Grafana/")


async def test_no_route_for_the_method_goes_to_the_datasource_url(scene: ProxyScene) -> None:
    # The api route is GET only; a POST falls through to the datasource URL, untouched by it.
    answer = await scene.proxy("px", "api/things", method="POST", user="viewer", data=b"{}")
    assert answer.status == 200, answer.text
    seen = scene.datasource.seen[-1]
    assert (seen.method, seen.raw_path, seen.body) == ("POST", "/base/api/things", b"{}")
    assert "X-Api-Key" not in seen.headers


@pytest.mark.parametrize(
    ("rest", "user", "status", "upstream"),
    [
        ("admin/x", "viewer", 403, None),
        ("admin/x", "editor", 403, None),
        ("admin/x", "admin", 200, "/upstream-admin/x"),
        ("administrators", "viewer", 403, None),  # plain prefix match, as Grafana
        ("editor/x", "viewer", 403, None),
        ("editor/x", "editor", 200, "/base/editor/x"),  # no url: the datasource URL
        ("action", "editor", 403, None),  # reqAction without RBAC needs Admin
        ("action", "admin", 200, "/base/action"),
        ("other/x", "viewer", 200, "/base/other/x"),  # no route: Viewer is enough
    ],
)
async def test_route_roles(
    scene: ProxyScene, rest: str, user: str, status: int, upstream: str | None
) -> None:
    before = len(scene.datasource.seen)
    answer = await scene.proxy("px", rest, user=user)
    if status == 403:
        assert_status(answer, 403, "Forbidden", "plugin proxy route access denied")
        assert len(scene.datasource.seen) == before  # nothing went out
    else:
        assert answer.status == status, answer.text
        assert scene.datasource.seen[-1].raw_path == upstream


async def test_route_body_replaces_the_request_body(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "body/run", method="POST", data=b"caller's body")
    assert answer.status == 200, answer.text
    seen = scene.datasource.seen[-1]
    assert seen.raw_path == "/echo/run"
    assert json.loads(seen.body) == {"tenant": "t1", "secret": "cs1"}


async def test_python_fixture_routes(scene: ProxyScene) -> None:
    """The Python fixture plugin's own plugin.json routes, through its own DataPlaneService."""
    answer = await scene.proxy("py", "api/v1/series", group=PY_GROUP, user="viewer")
    assert answer.status == 200, answer.text
    seen = scene.datasource.seen[-1]
    assert seen.raw_path == "/api/v1/series"
    assert seen.headers["Authorization"] == "Bearer py-token"
    denied = await scene.proxy("py", "admin/users", group=PY_GROUP, user="editor")
    assert_status(denied, 403, "Forbidden", "needs the Admin role")
    answer = await scene.proxy("py", "admin/users", group=PY_GROUP, user="admin")
    assert answer.status == 200, answer.text
    assert scene.datasource.seen[-1].raw_path == "/admin/users?tenant="  # orEmpty: empty


# -- tokens --------------------------------------------------------------------------------------


async def test_tokens_are_cached_refreshed_and_never_shared(scene: ProxyScene) -> None:
    ds = scene.datasource
    ds.token_lifetime = 3600
    issued = ds.tokens_issued
    first = await scene.proxy("px", "oauth/a")
    second = await scene.proxy("px", "oauth/b")
    assert (first.status, second.status) == (200, 200), (first.text, second.text)
    bearer = ds.seen[-1].headers["Authorization"]
    assert bearer == f"Bearer tok-{issued + 1}-cs1"
    assert ds.requests_to("/echo/a")[-1].headers["Authorization"] == bearer
    assert ds.tokens_issued == issued + 1  # cached: one fetch for two requests
    token_request = ds.requests_to("/token")[-1]
    assert token_request.method == "POST"
    assert token_request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = dict(pair.split("=", 1) for pair in token_request.body.decode().split("&"))
    assert form == {"client_id": "cid", "client_secret": "cs1", "grant_type": "client_credentials"}
    # Another datasource with the same route gets its own token.
    other = await scene.proxy("px2", "oauth/c")
    assert other.status == 200, other.text
    assert ds.seen[-1].headers["Authorization"] == f"Bearer tok-{issued + 2}-cs2"
    # A token within 10 s of expiry is fetched again for every request.
    scene.door.bridge.datasource_proxy.tokens.clear()
    ds.token_lifetime = 5
    await scene.proxy("px", "oauth/d")
    await scene.proxy("px", "oauth/e")
    assert ds.tokens_issued == issued + 4
    ds.token_lifetime = 3600


async def test_concurrent_requests_share_one_token_fetch(scene: ProxyScene) -> None:
    ds = scene.datasource
    scene.door.bridge.datasource_proxy.tokens.clear()
    issued = ds.tokens_issued
    answers = await asyncio.gather(*(scene.proxy("px", f"oauth/{i}") for i in range(8)))
    assert [a.status for a in answers] == [200] * 8
    assert ds.tokens_issued == issued + 1


async def test_authentication_type_from_the_datasource_overrides_the_route(
    scene: ProxyScene,
) -> None:
    ds = scene.datasource
    issued = ds.tokens_issued
    # A plugin's own authenticationType value ("keys"): no token, the request still goes out.
    answer = await scene.proxy("auth-keys", "oauth/k")
    assert answer.status == 200, answer.text
    assert "Authorization" not in ds.seen[-1].headers
    assert ds.tokens_issued == issued
    # A token type the bridge does not implement: 501, nothing sent.
    before = len(ds.seen)
    answer = await scene.proxy("auth-jwt", "oauth/j")
    assert_status(answer, 501, "NotImplemented", "needs jwt token authentication")
    assert len(ds.seen) == before


async def test_token_endpoint_failure_is_a_502(scene: ProxyScene) -> None:
    ds = scene.datasource
    scene.door.bridge.datasource_proxy.tokens.clear()
    ds.token_status = 401
    before = len(ds.requests_to("/echo"))
    try:
        answer = await scene.proxy("px", "oauth/x")
    finally:
        ds.token_status = 200
    assert_status(answer, 502, "BadGateway", "the token endpoint answered 401")
    assert len(ds.requests_to("/echo")) == before


# -- safety --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rest",
    [
        "../x",
        "a/../../x",
        "%2e%2e/x",
        "a/%2E%2E/%2e%2e/x",
        ".%2e/x",
        "/x",  # .../proxy//x
        "a//b",
        "a%2fb",
        "a%2Fb/..",
        "a%5cb",
        "a\\b",
        "a%00b",
    ],
)
async def test_traversal_is_refused_before_anything_goes_out(scene: ProxyScene, rest: str) -> None:
    before = len(scene.datasource.seen)
    answer = await scene.door.call("GET", f"{BASE}/px/proxy/{rest}", user="admin")
    assert_status(answer, 400, "BadRequest", "invalid request path")
    assert len(scene.datasource.seen) == before


@pytest.mark.parametrize(
    "rest",
    [
        "other/..;/editor/x",  # Tomcat/Jetty/Spring read "..;" as ".." (route authz bypass)
        "other/..;jsessionid=1/admin",
        "a/.;/b",
        "other/%2e%2e;/editor/x",
        "x/..%3B/editor",  # an encoded ";" is decoded once by the front door: the same thing
    ],
)
async def test_dot_segments_with_parameters_are_refused(scene: ProxyScene, rest: str) -> None:
    before = len(scene.datasource.seen)
    answer = await scene.proxy("px", rest, user="viewer")
    assert_status(answer, 400, "BadRequest", "path parameters")
    assert len(scene.datasource.seen) == before


async def test_path_is_encoded_once_and_confined(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "q/a%20b/c%3Fd%23e/%25?x=%2F")
    assert answer.status == 200, answer.text
    assert scene.datasource.seen[-1].raw_path == "/base/q/a%20b/c%3Fd%23e/%25?x=%2F"


async def test_caller_credentials_and_cookies_stay_behind(scene: ProxyScene) -> None:
    sent = {
        "Cookie": "grafana_session=secret; keep=1; other=2",
        "X-Grafana-User": "mallory",
        "X-Grafana-Org-Id": "7",
        "X-WEBAUTH-USER": "admin",
        "Origin": "http://evil",
        "X-Custom": "yes",
        "X-Forwarded-For": "10.0.0.1",
    }
    answer = await scene.proxy("py", "other", group=PY_GROUP, headers=sent)
    assert answer.status == 200, answer.text
    h = scene.datasource.seen[-1].headers
    assert "Authorization" not in h  # the caller's bearer token for the bridge
    assert "Cookie" not in h  # the py datasource keeps no cookies
    for name in ("X-Grafana-User", "X-Grafana-Org-Id", "X-WEBAUTH-USER", "Origin"):
        assert name not in h, name
    assert h["X-Custom"] == "yes"
    assert h["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    # keepCookies keeps the listed cookie, never Grafana's session.
    await scene.proxy("px2", "other", headers=sent)
    assert scene.datasource.seen[-1].headers["Cookie"] == "keep=1"
    # X-DS-Authorization becomes Authorization (and wins over nothing else).
    await scene.proxy("px2", "other", headers={"X-DS-Authorization": "Bearer ds"})
    h = scene.datasource.seen[-1].headers
    assert (h["Authorization"], h.get("X-DS-Authorization")) == ("Bearer ds", None)


async def test_datasource_custom_headers(scene: ProxyScene) -> None:
    """httpHeaderNameN/httpHeaderValueN are sent, except an identity header (CVE-2022-35957)."""
    answer = await scene.proxy("px2", "other", headers={"X-WEBAUTH-USER": "mallory"})
    assert answer.status == 200, answer.text
    h = scene.datasource.seen[-1].headers
    assert h["X-Custom-Auth"] == "custom-secret"
    assert "X-WEBAUTH-USER" not in h


async def test_response_is_scrubbed(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "other")
    assert answer.status == 200, answer.text
    assert "Set-Cookie" not in answer.headers
    assert answer.headers["X-Upstream"] == "yes"
    assert answer.headers["Content-Security-Policy"] == "sandbox"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


async def test_upstream_401_becomes_400(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "unauthorized")
    assert_status(answer, 400, "BadRequest", "Authentication to data source failed")
    assert "WWW-Authenticate" not in answer.headers


@pytest.mark.parametrize(
    ("rest", "location"),
    [
        ("dir/redirect-inside", f"{BASE}/px/proxy/dir/landed?from=redirect"),
        ("redirect-absolute", f"{BASE}/px/proxy/elsewhere"),
    ],
)
async def test_redirects_under_the_datasource_are_mapped(
    scene: ProxyScene, rest: str, location: str
) -> None:
    async with scene.door.session.get(
        scene.door.target(f"{BASE}/px/proxy/{rest}"),
        headers=auth_headers("admin"),
        allow_redirects=False,
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == location


@pytest.mark.parametrize("rest", ["redirect-outside", "redirect-up"])
async def test_redirects_elsewhere_are_not_followed(scene: ProxyScene, rest: str) -> None:
    answer = await scene.proxy("px", rest)
    assert_status(answer, 502, "BadGateway", "redirects are not followed")
    assert scene.other.seen == []


async def test_location_elsewhere_on_a_non_redirect_is_dropped(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "created-elsewhere", method="POST", data=b"{}")
    assert answer.status == 201, answer.text
    assert "Location" not in answer.headers


async def test_allow_list(scene: ProxyScene) -> None:
    before = len(scene.datasource.seen)
    answer = await scene.proxy("elsewhere", "x")
    assert_status(answer, 403, "Forbidden", "target URL is not a valid target")
    assert "localhost" in answer.json()["message"]
    assert len(scene.datasource.seen) == before


@pytest.mark.parametrize(
    ("rest", "upstream"),
    [("q/x?a=1", "/base/q/x?a=1"), ("api/x", "/upstream-api/x?key=s3cret&tenant=t1")],
)
async def test_ipv6_literal_destinations(scene: ProxyScene, rest: str, upstream: str) -> None:
    """A datasource URL (and a route url) with an IPv6 literal keeps its brackets."""
    answer = await scene.proxy("v6", rest, user="viewer")
    assert answer.status == 200, answer.text
    seen = scene.datasource.seen[-1]
    assert seen.raw_path == upstream
    assert seen.headers["Host"].startswith("[::1]:")


@pytest.mark.parametrize(
    ("uid", "code", "reason", "message"),
    [
        ("nourl", 502, "BadGateway", "has no URL"),
        ("down", 502, "BadGateway", "could not be reached"),
        ("missing", 404, "NotFound", "not found"),
        ("py", 404, "NotFound", "not 'bridge-pyproxy-datasource'"),  # another plugin's
    ],
)
async def test_datasource_failures(
    scene: ProxyScene, uid: str, code: int, reason: str, message: str
) -> None:
    assert_status(await scene.proxy(uid, "x"), code, reason, message)


async def test_tls_verification(scene: ProxyScene) -> None:
    assert_status(await scene.proxy("tls-strict", "x"), 502, "BadGateway", "could not be reached")
    for uid in ("tls-skip", "tls-ca"):  # jsonData.tlsSkipVerify; tlsAuthWithCACert + tlsCACert
        answer = await scene.proxy(uid, f"secure/{uid}")
        assert answer.status == 200, answer.text
        assert answer.json()["path"] == f"/secure/{uid}"


async def test_unsupported_token_type_is_a_501(scene: ProxyScene) -> None:
    before = len(scene.datasource.seen)
    answer = await scene.proxy("px", "azure/x")
    assert_status(answer, 501, "NotImplemented", "needs azure token authentication")
    assert len(scene.datasource.seen) == before


async def test_response_limit(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "huge")
    assert_status(answer, 502, "BadGateway", f"more than {RESPONSE_LIMIT} bytes")
    # Without a length it is cut off once over the limit: the body ends early, not a hang.
    with pytest.raises(aiohttp.ClientPayloadError):
        await scene.proxy("px", "huge-stream")
    assert (await scene.proxy("px", "fine")).status == 200


async def test_timeout_is_a_504_and_the_bridge_keeps_serving(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "slow")
    assert_status(answer, 504, "Timeout", "did not answer within 0.5s")
    assert (await scene.proxy("px", "fine")).status == 200


# -- dial and token timeouts ---------------------------------------------------------------------

HOP_TIMEOUT = 0.5  # datasource_proxy.dial_timeout and token_timeout of the scene below


@dataclass
class SilentServer:
    """Accepts connections and reads requests, never answers: a token endpoint that hangs."""

    url: str = ""
    requests: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            await self.stop.wait()
        writer.close()


@dataclass
class TimeoutScene:
    scene: ProxyScene
    silent: SilentServer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def timeouts(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TimeoutScene]:
    """A bridge with short dial and token timeouts; datasources behind a token endpoint that
    never answers and behind a host that takes no connection."""
    root = tmp_path_factory.mktemp("dsproxy-timeouts")
    plugins = root / "plugins"
    write_plugin(plugins)
    datasource_api = StandInDatasource()
    silent = SilentServer()
    server = await asyncio.start_server(silent.handle, "127.0.0.1", 0)
    silent.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        with listener_that_never_accepts() as port:
            async with serving(datasource_api.app()) as ds_url:
                oauth = {"clientId": "cid", "url": silent.url}  # the token url renders from it
                write_datasources(
                    root / "provisioning",
                    {**datasource(PROXY, "ok"), "url": f"{ds_url}/base"},
                    {
                        **datasource(PROXY, "hanging-token", json_data=oauth),
                        "url": f"{ds_url}/base",
                        "secureJsonData": {"clientSecret": "cs"},
                    },
                    {**datasource(PROXY, "no-accept"), "url": f"http://127.0.0.1:{port}/"},
                )
                write_manifest(
                    root / "dataplane",
                    "proxy.yaml",
                    dataplane_service(PROXY, PROXY_GROUP, services=({"type": "datasource-proxy"},)),
                )
                config = bridge_config(
                    root,
                    plugin_dirs=(plugins,),
                    allow_unsigned=(PROXY,),
                    overrides={
                        "datasource_proxy.dial_timeout": HOP_TIMEOUT,
                        "datasource_proxy.token_timeout": HOP_TIMEOUT,
                        "datasource_proxy.allowed_hosts": ["127.0.0.1"],
                    },
                )
                async with front_door(config) as door:
                    yield TimeoutScene(
                        ProxyScene(door, datasource_api, StandInDatasource()), silent
                    )
    finally:
        silent.stop.set()
        server.close()
        await server.wait_closed()


async def timed(scene: ProxyScene, uid: str, rest: str) -> tuple[Any, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await scene.proxy(uid, rest)
    return answer, loop.time() - started


async def test_token_endpoint_that_never_answers_is_a_502_within_token_timeout(
    timeouts: TimeoutScene,
) -> None:
    scene = timeouts.scene
    before = timeouts.silent.requests
    answer, seconds = await timed(scene, "hanging-token", "oauth/x")
    assert_status(answer, 502, "BadGateway", f"did not answer within {HOP_TIMEOUT:g}s")
    assert "could not get an access token for route 4 (* oauth)" in answer.json()["message"]
    assert HOP_TIMEOUT <= seconds < HOP_TIMEOUT + 2
    assert timeouts.silent.requests == before + 1  # the token endpoint was asked, once
    assert scene.datasource.requests_to("/echo") == []  # the request itself never went out
    # The bridge keeps serving: the same datasource without a token, and another one.
    assert (await scene.proxy("hanging-token", "other")).status == 200
    assert (await scene.proxy("ok", "fine")).status == 200


async def test_datasource_that_takes_no_connection_is_a_504_within_dial_timeout(
    timeouts: TimeoutScene,
) -> None:
    scene = timeouts.scene
    answers = await asyncio.gather(*(timed(scene, "no-accept", f"x{i}") for i in range(3)))
    for answer, seconds in answers:
        assert_status(answer, 504, "Timeout", f"could not be connected to within {HOP_TIMEOUT:g}s")
        assert HOP_TIMEOUT <= seconds < HOP_TIMEOUT + 2
    assert (await scene.proxy("ok", "fine")).status == 200


# -- bodies ----------------------------------------------------------------------------------


async def test_response_is_streamed(scene: ProxyScene) -> None:
    scene.datasource.release_stream.clear()
    async with scene.door.session.get(
        scene.door.target(f"{BASE}/px/proxy/stream"), headers=auth_headers("admin")
    ) as response:
        assert response.status == 200
        # The first chunk arrives while the datasource is still holding back the second.
        assert await response.content.readline() == b"first\n"
        scene.datasource.release_stream.set()
        assert await response.content.read() == b"second\n"


async def test_upload_is_streamed_and_limited(scene: ProxyScene) -> None:
    payload = b"x" * (MAX_BODY - 1)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    async with scene.door.session.post(
        scene.door.target(f"{BASE}/px/proxy/upload"), headers=auth_headers("admin"), data=chunks()
    ) as response:
        assert response.status == 200, await response.text()
    assert len(scene.datasource.seen[-1].body) == len(payload)
    before = len(scene.datasource.seen)
    big = await scene.proxy("px", "upload", method="POST", data=b"x" * (MAX_BODY + 1))
    assert_status(big, 413, "RequestEntityTooLarge", "larger than the limit")
    assert len(scene.datasource.seen) == before

    async def too_many() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 8192 + 2):
            yield b"y" * 8192

    async with scene.door.session.post(
        scene.door.target(f"{BASE}/px/proxy/upload"),
        headers=auth_headers("admin"),
        data=too_many(),
    ) as response:
        assert response.status == 413, await response.text()


async def test_metrics_count_answers_by_code(scene: ProxyScene) -> None:
    before = await scene.door.metrics()
    name = "grafana_bridge_datasource_proxy_requests_total"
    denied = sample(before, name, plugin_id=PROXY, code="403") or 0.0
    await scene.proxy("px", "admin/x", user="viewer")
    after = await scene.door.metrics()
    assert sample(after, name, plugin_id=PROXY, code="403") == denied + 1
    assert (sample(after, name, plugin_id=PROXY, code="200") or 0) > 0


async def test_head_has_no_body(scene: ProxyScene) -> None:
    answer = await scene.proxy("px", "other", method="HEAD")
    assert (answer.status, answer.body) == (200, b"")
