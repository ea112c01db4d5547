"""A bridge serving the ``datasource-proxy`` service type, and a real HTTP datasource behind it.

The stand-in datasource is an aiohttp server on a loopback port: it records every request as
it arrived (raw path, headers, body) and answers by path — echo, token endpoint, redirects, a
401, ``Set-Cookie``, a slow answer, a streamed answer. A second server stands for "some other
host" that redirects point to; it must never be contacted.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import yaml
from aiohttp import web
from multidict import CIMultiDict

from bridge.config import BridgeConfig
from tests.bridge.conftest import (
    PY,
    PY_GROUP,
    FrontDoor,
    bridge_config,
    dataplane_service,
    free_port,
    front_door,
    python_fixture_as,
    serving,
    write_manifest,
)

PROXY = "bridge-pyproxy-datasource"
PROXY_GROUP = "pyproxy.datasource.grafana.app"
SERVICES = ({"type": "datasource-proxy"},)
MAX_BODY = 256 * 1024
TIMEOUT = 0.5
RESPONSE_LIMIT = 512 * 1024

# Every form a route can use: url, urlParams, headers, body, tokenAuth, reqRole, reqAction.
ROUTES: list[dict[str, Any]] = [
    {
        "path": "api",
        "method": "GET",
        "reqRole": "Viewer",
        "url": "{{.JsonData.url}}/upstream-api",
        "urlParams": [
            {"name": "tenant", "content": "{{.JsonData.tenant}}"},
            {"name": "key", "content": "{{ .SecureJsonData.apiToken | orEmpty }}"},
        ],
        "headers": [
            {"name": "X-Api-Key", "content": "{{.SecureJsonData.apiToken}}"},
            {"name": "X-Region", "content": "{{.JsonData.nested.region}}"},
            {"name": "X-Missing", "content": "{{.JsonData.nope}}"},
            {"name": "X-Or-Empty", "content": "[{{orEmpty .JsonData.nope}}]"},
            {"name": "X-Secret-Or-Empty", "content": "[{{orEmpty .SecureJsonData.nope}}]"},
            {
                "name": "X-Values",
                "content": "{{.JsonData.num}} {{.JsonData.flag}} {{.JsonData.list}}",
            },
            {"name": "X-Trimmed", "content": "a  {{- .JsonData.tenant -}}  b"},
        ],
    },
    {"path": "admin", "method": "*", "reqRole": "Admin", "url": "{{.JsonData.url}}/upstream-admin"},
    {"path": "/editor/", "reqRole": "Editor"},
    {
        "path": "body",
        "method": "POST",
        "url": "{{.JsonData.url}}/echo",
        "body": {"tenant": "{{.JsonData.tenant}}", "secret": "{{.SecureJsonData.clientSecret}}"},
    },
    {
        "path": "oauth",
        "url": "{{.JsonData.url}}/echo",
        "tokenAuth": {
            "url": "{{.JsonData.url}}/token",
            "params": {
                "grant_type": "client_credentials",
                "client_id": "{{.JsonData.clientId}}",
                "client_secret": "{{.SecureJsonData.clientSecret}}",
            },
        },
    },
    {"path": "action", "reqAction": "datasources:write"},
    {"path": "azure", "authType": "azure", "tokenAuth": {"url": "{{.JsonData.url}}/token"}},
]


@dataclass(frozen=True)
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(self.raw_path.partition("?")[2], keep_blank_values=True)


@dataclass
class StandInDatasource:
    """A datasource's HTTP API; ``seen`` holds every request it got, in order."""

    seen: list[Seen] = field(default_factory=list)
    tokens_issued: int = 0
    token_lifetime: float = 3600.0
    token_status: int = 200
    other_url: str = ""  # where /base/redirect-outside points
    release_stream: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._answer)
        return app

    def requests_to(self, prefix: str) -> list[Seen]:
        return [s for s in self.seen if s.raw_path.startswith(prefix)]

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        path = request.path
        if path == "/token":
            return self._token(body)
        if path.endswith("/redirect-inside"):
            raise web.HTTPFound("landed?from=redirect")
        if path.endswith("/redirect-absolute"):
            raise web.HTTPFound(f"http://{request.host}/base/elsewhere")
        if path.endswith("/redirect-outside"):
            raise web.HTTPFound(f"{self.other_url}/stolen")
        if path.endswith("/created-elsewhere"):
            return web.json_response({}, status=201, headers={"Location": f"{self.other_url}/x"})
        if path.endswith("/redirect-up"):
            raise web.HTTPFound("/outside-base")
        if path.endswith("/unauthorized"):
            return web.json_response(
                {"error": "bad key"}, status=401, headers={"WWW-Authenticate": "Basic"}
            )
        if path.endswith("/slow"):
            self.slow_started.set()
            await asyncio.sleep(10)
        if path.endswith("/stream"):
            return await self._stream(request)
        if path.endswith("/huge"):
            return web.Response(body=b"h" * (RESPONSE_LIMIT + 1))
        if path.endswith("/huge-stream"):
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(RESPONSE_LIMIT // 65536 + 2):
                await response.write(b"s" * 65536)
            await response.write_eof()
            return response
        described = {
            "method": request.method,
            "path": request.raw_path,
            "length": len(body),
        }
        response = web.json_response(described)
        response.set_cookie("upstream_session", "leak")
        response.headers["X-Upstream"] = "yes"
        return response

    def _token(self, body: bytes) -> web.Response:
        if self.token_status != 200:
            return web.json_response({"error": "invalid_client"}, status=self.token_status)
        self.tokens_issued += 1
        form = dict(parse_qsl(body.decode()))
        return web.json_response(
            {
                "access_token": f"tok-{self.tokens_issued}-{form.get('client_secret', '')}",
                "expires_in": self.token_lifetime,
                "token_type": "Bearer",
            }
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first\n")
        await asyncio.wait_for(self.release_stream.wait(), 10)
        await response.write(b"second\n")
        await response.write_eof()
        return response


def write_plugin(plugins: Path) -> None:
    directory = python_fixture_as(plugins, PROXY)
    manifest = json.loads((directory / "plugin.json").read_text())
    manifest["routes"] = ROUTES
    (directory / "plugin.json").write_text(json.dumps(manifest))


def provisioned(ds_url: str, tls_url: str, ca: str, v6_url: str) -> list[dict[str, Any]]:
    json_data = {
        "url": ds_url,
        "tenant": "t1",
        "nested": {"region": "eu"},
        "num": 3,
        "flag": True,
        "list": [1, "two"],
        "clientId": "cid",
        "keepCookies": ["keep"],
    }
    secure = {"apiToken": "s3cret", "clientSecret": "cs1", "basicAuthPassword": "pw"}
    return [
        {
            "name": "px",
            "uid": "px",
            "type": PROXY,
            "url": f"{ds_url}/base",
            "basicAuth": True,
            "basicAuthUser": "bob",
            "jsonData": json_data,
            "secureJsonData": secure,
        },
        {
            "name": "px2",
            "uid": "px2",
            "type": PROXY,
            "url": f"{ds_url}/base",
            "jsonData": {
                **json_data,
                "httpHeaderName1": "X-Custom-Auth",
                "httpHeaderName2": "X-WEBAUTH-USER",
            },
            "secureJsonData": {
                **secure,
                "clientSecret": "cs2",
                "httpHeaderValue1": "custom-secret",
                "httpHeaderValue2": "admin",
            },
        },
        *(
            {
                "name": f"auth-{kind}",
                "uid": f"auth-{kind}",
                "type": PROXY,
                "url": f"{ds_url}/base",
                "jsonData": {**json_data, "authenticationType": kind},
                "secureJsonData": secure,
            }
            for kind in ("keys", "jwt")
        ),
        {  # an IPv6 literal, for the datasource URL and for a route's url
            "name": "v6",
            "uid": "v6",
            "type": PROXY,
            "url": f"{v6_url}/base",
            "jsonData": {**json_data, "url": v6_url},
            "secureJsonData": secure,
        },
        {"name": "nourl", "uid": "nourl", "type": PROXY},
        {"name": "down", "uid": "down", "type": PROXY, "url": f"http://127.0.0.1:{free_port()}"},
        {
            "name": "elsewhere",
            "uid": "elsewhere",
            "type": PROXY,
            "url": f"{ds_url.replace('127.0.0.1', 'localhost')}/",
        },
        {"name": "tls-strict", "uid": "tls-strict", "type": PROXY, "url": tls_url},
        {
            "name": "tls-skip",
            "uid": "tls-skip",
            "type": PROXY,
            "url": tls_url,
            "jsonData": {"tlsSkipVerify": True},
        },
        {
            "name": "tls-ca",
            "uid": "tls-ca",
            "type": PROXY,
            "url": tls_url,
            "jsonData": {"tlsAuthWithCACert": True},
            "secureJsonData": {"tlsCACert": ca},
        },
        {
            "name": "py",
            "uid": "py",
            "type": PY,
            "url": f"{ds_url}/base",
            "jsonData": {"url": ds_url},
            "secureJsonData": {"apiToken": "py-token"},
        },
    ]


def proxy_config(root: Path, ds_url: str, tls_url: str, ca: str, v6_url: str) -> BridgeConfig:
    plugins = root / "plugins"
    write_plugin(plugins)
    python_fixture_as(plugins, PY)  # the Python fixture's own plugin.json and routes
    provisioning = root / "provisioning" / "datasources"
    provisioning.mkdir(parents=True)
    (provisioning / "proxy.yaml").write_text(
        yaml.safe_dump({"apiVersion": 1, "datasources": provisioned(ds_url, tls_url, ca, v6_url)})
    )
    write_manifest(
        root / "dataplane",
        "proxy.yaml",
        dataplane_service(PROXY, PROXY_GROUP, services=SERVICES),
        dataplane_service(PY, PY_GROUP, services=SERVICES),
    )
    return bridge_config(
        root,
        plugin_dirs=(plugins,),
        allow_unsigned=(PROXY, PY),
        overrides={
            "datasource_proxy.timeout": TIMEOUT,
            "datasource_proxy.allowed_hosts": ["127.0.0.1", "[::1]"],
            "limits.max_body_bytes": MAX_BODY,
            "datasource_proxy.response_limit_bytes": RESPONSE_LIMIT,
        },
    )


@dataclass
class ProxyScene:
    door: FrontDoor
    datasource: StandInDatasource
    other: StandInDatasource

    async def proxy(
        self,
        uid: str,
        rest: str,
        *,
        method: str = "GET",
        user: str = "admin",
        group: str = PROXY_GROUP,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Any:
        path = f"/apis/{group}/v0alpha1/namespaces/default/datasources/{uid}/proxy/{rest}"
        return await self.door.call(method, path, user=user, headers=headers, data=data)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (openssl), and its key."""
    cert, key = directory / "ds.crt", directory / "ds.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def serving_at(
    app: web.Application, host: str, context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """``app`` on ``host`` (an IPv6 literal too), over TLS with ``context``; its base URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        netloc = f"[{host}]" if ":" in host else host
        yield f"{'https' if context else 'http'}://{netloc}:{port}"
    finally:
        await runner.cleanup()


def serving_tls(app: web.Application, cert: Path, key: Path) -> AbstractAsyncContextManager[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return serving_at(app, "127.0.0.1", context)


@asynccontextmanager
async def proxy_scene(root: Path) -> AsyncIterator[ProxyScene]:
    datasource = StandInDatasource()
    other = StandInDatasource()
    cert, key = self_signed(root)
    async with (
        serving(other.app()) as other_url,
        serving(datasource.app()) as ds_url,
        serving_tls(datasource.app(), cert, key) as tls_url,
        serving_at(datasource.app(), "::1") as v6_url,
    ):
        datasource.other_url = other_url
        config = proxy_config(root, ds_url, tls_url, cert.read_text(), v6_url)
        async with front_door(config) as door:
            yield ProxyScene(door, datasource, other)
