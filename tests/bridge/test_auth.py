"""Authentication against a real HTTP stand-in for Grafana, token files, anonymous, namespaces."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from multidict import CIMultiDict
from pydantic import ValidationError

from bridge.auth import (
    AnonymousSettings,
    AuthSettings,
    Fetch,
    GrafanaAuthenticator,
    OrgGrant,
    TokenAuthenticator,
    TokenFileError,
    authorize_namespace,
    build_authenticator,
    credential_headers,
    forwardable_headers,
    parse_token_file,
    query_headers,
    require_identity,
)
from bridge.delegate import Delegate, DelegateSettings
from bridge.identity import Identity, OrgRole
from bridge.status import StatusError

SA_TOKEN = "glsa_0123456789abcdef0123456789abcdef_deadbeef"
API_KEY = "eyJrIjoiT0tTcG1pUlY2RnVKZTFVaDFsNFZXdE9ZWmNrMkZYbk"
OLD_SA_TOKEN = "glsa_old_grafana_token"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Principal:
    profile: dict[str, Any]
    orgs: list[dict[str, Any]] | None  # None: "Endpoint only available for users"


PRINCIPALS: dict[str, Principal] = {
    "session:sess-ann": Principal(
        {
            "id": 2,
            "uid": "ann-uid",
            "login": "ann",
            "name": "Ann",
            "email": "ann@example.com",
            "orgId": 1,
            "isGrafanaAdmin": False,
        },
        [
            {"orgId": 1, "name": "Main Org.", "role": "Editor"},
            {"orgId": 3, "name": "Ops", "role": "Admin"},
        ],
    ),
    f"auth:{basic('bob', 'secret')}": Principal(
        {
            "id": 3,
            "uid": "bob-uid",
            "login": "bob",
            "name": "Bob",
            "email": "bob@example.com",
            "orgId": 2,
            "isGrafanaAdmin": False,
        },
        [{"orgId": 2, "name": "Team", "role": "Viewer"}],
    ),
    f"auth:{basic('root', 'toor')}": Principal(
        {
            "id": 1,
            "uid": "root-uid",
            "login": "admin",
            "name": "Admin",
            "email": "",
            "orgId": 1,
            "isGrafanaAdmin": True,
        },
        [{"orgId": 1, "name": "Main Org.", "role": "Admin"}],
    ),
    f"auth:Bearer {SA_TOKEN}": Principal(
        {
            "uid": "service-account:sa-uid",
            "login": "sa-2-robot",
            "name": "robot",
            "email": "",
            "orgId": 2,
            "isGrafanaAdmin": False,
        },
        None,
    ),
    f"auth:Bearer {API_KEY}": Principal(
        {
            "uid": "api-key:5",
            "login": "api-key",
            "name": "legacy",
            "email": "",
            "orgId": 1,
            "isGrafanaAdmin": False,
        },
        None,
    ),
    f"auth:Bearer {OLD_SA_TOKEN}": Principal(
        {"login": "sa-1-old", "name": "old", "email": "", "orgId": 1, "isGrafanaAdmin": False},
        None,
    ),
}


@dataclass
class FakeGrafana:
    """Grafana's /api/user and /api/user/orgs, answering by the credential it is sent."""

    calls: Counter[str] = field(default_factory=Counter)
    seen: list[CIMultiDict[str]] = field(default_factory=list)
    status: int | None = None
    gate: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def principal(self, request: web.Request) -> Principal | None:
        if "Authorization" in request.headers:
            return PRINCIPALS.get(f"auth:{request.headers['Authorization']}")
        session = request.cookies.get("grafana_session")
        return PRINCIPALS.get(f"session:{session}") if session else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls[request.path] += 1
        self.seen.append(CIMultiDict(request.headers))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status is not None:
            return web.json_response({"message": "boom"}, status=self.status)
        principal = self.principal(request)
        if principal is None:
            return web.json_response({"message": "Unauthorized"}, status=401)
        if request.path == "/api/user":
            return web.json_response(principal.profile)
        if principal.orgs is None:
            return web.json_response({"message": "Endpoint only available for users"}, status=403)
        return web.json_response(principal.orgs)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/user", self.handle)
        app.router.add_get("/api/user/orgs", self.handle)
        return app


@dataclass
class Grafana:
    fake: FakeGrafana
    fetch: Fetch


@pytest.fixture
async def grafana() -> AsyncIterator[Grafana]:
    fake = FakeGrafana()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield Grafana(fake, http_fetch(session, str(server.make_url(""))))
    await server.close()


def http_fetch(session: aiohttp.ClientSession, base: str) -> Fetch:
    """What bridge/delegate.py's Delegate.fetch_json does, reduced to (path, headers)."""

    async def fetch(path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        async with session.get(base.rstrip("/") + path, headers=dict(headers)) as response:
            return response.status, await response.json(content_type=None)

    return fetch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(headers: Mapping[str, str] | list[tuple[str, str]] | None = None) -> web.Request:
    return make_mocked_request(
        "GET", "/apis/x/v0/namespaces/default/q", headers=CIMultiDict(headers or {})
    )


def authenticator(
    grafana: Grafana, clock: Callable[[], float] | None = None, **settings: Any
) -> GrafanaAuthenticator:
    return GrafanaAuthenticator(
        grafana.fetch, AuthSettings(**settings), **({"clock": clock} if clock else {})
    )


# --- grafana mode: credentials ---------------------------------------------------------------


async def test_session_cookie_names_the_user_and_role(grafana: Grafana) -> None:
    auth = authenticator(grafana)
    who = await auth.authenticate(
        request({"Cookie": "theme=dark; grafana_session=sess-ann; grafana_session_expiry=17; x=1"})
    )
    assert who == Identity(
        login="ann",
        name="Ann",
        email="ann@example.com",
        org_id=1,
        role=OrgRole.EDITOR,
        is_server_admin=False,
        uid="ann-uid",
        auth_method="session",
    )
    # Only the session cookies reached Grafana, on both calls.
    assert [h["Cookie"] for h in grafana.fake.seen] == [
        "grafana_session=sess-ann; grafana_session_expiry=17"
    ] * 2
    assert grafana.fake.calls == Counter({"/api/user": 1, "/api/user/orgs": 1})


async def test_only_credential_headers_reach_grafana(grafana: Grafana) -> None:
    auth = authenticator(grafana)
    await auth.authenticate(
        request(
            {
                "Authorization": basic("bob", "secret"),
                "X-Secret-Thing": "no",
                "X-Grafana-User": "mallory",
                "Cookie": "other=1",
            }
        )
    )
    for seen in grafana.fake.seen:
        assert seen["Authorization"] == basic("bob", "secret")
        assert "X-Secret-Thing" not in seen and "X-Grafana-User" not in seen
        assert "Cookie" not in seen


@pytest.mark.parametrize(
    ("headers", "login", "org_id", "role", "admin", "method"),
    [
        ({"Authorization": basic("bob", "secret")}, "bob", 2, OrgRole.VIEWER, False, "basic"),
        ({"Authorization": basic("root", "toor")}, "admin", 1, OrgRole.ADMIN, True, "basic"),
        (
            {"Authorization": f"bearer {SA_TOKEN}"},
            "sa-2-robot",
            2,
            OrgRole.EDITOR,
            False,
            "service_account",
        ),
        ({"Authorization": f"Bearer {API_KEY}"}, "api-key", 1, OrgRole.EDITOR, False, "api_key"),
        (
            {"Authorization": f"Bearer {OLD_SA_TOKEN}"},
            "sa-1-old",
            1,
            OrgRole.EDITOR,
            False,
            "service_account",
        ),
        (
            {"Cookie": "grafana_session=sess-ann", "X-Grafana-Org-Id": "3"},
            "ann",
            3,
            OrgRole.ADMIN,
            False,
            "session",
        ),
    ],
)
async def test_credential_kinds(
    grafana: Grafana,
    headers: dict[str, str],
    login: str,
    org_id: int,
    role: OrgRole,
    admin: bool,
    method: str,
) -> None:
    auth = authenticator(grafana, service_account_role="Editor")
    who = await auth.authenticate(request(headers))
    assert who is not None
    assert (who.login, who.org_id, who.role, who.is_server_admin, who.auth_method) == (
        login,
        org_id,
        role,
        admin,
        method,
    )


async def test_service_accounts_get_the_configured_role_default_none(grafana: Grafana) -> None:
    who = await authenticator(grafana).authenticate(
        request({"Authorization": f"Bearer {SA_TOKEN}"})
    )
    assert who is not None and who.role is OrgRole.NONE
    # Grafana says who it is from /api/user alone; the org list is for users only.
    assert grafana.fake.calls == Counter({"/api/user": 1})


@pytest.mark.parametrize(
    ("headers", "code", "text"),
    [
        (
            {"Cookie": "grafana_session=sess-ann", "X-Grafana-Org-Id": "5"},
            403,
            "not a member of org 5",
        ),
        ({"Cookie": "grafana_session=sess-ann", "X-Grafana-Org-Id": "two"}, 400, "positive org id"),
        ({"Cookie": "grafana_session=sess-ann", "X-Grafana-Org-Id": "0"}, 400, "positive org id"),
        (
            {"Cookie": "grafana_session=sess-ann", "X-Grafana-Org-Id": "\u00b2"},
            400,
            "positive org id",
        ),
        ({"Authorization": f"Bearer {SA_TOKEN}", "X-Grafana-Org-Id": "1"}, 403, "belongs to org 2"),
        ({"Cookie": "grafana_session=stolen"}, 401, "did not accept"),
        ({"Authorization": basic("bob", "wrong")}, 401, "did not accept"),
    ],
)
async def test_refusals(grafana: Grafana, headers: dict[str, str], code: int, text: str) -> None:
    with pytest.raises(StatusError) as caught:
        await authenticator(grafana).authenticate(request(headers))
    assert caught.value.code == code
    assert text in caught.value.message


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Cookie": "theme=dark"},
        {"Authorization": "Negotiate abc"},
        {"Authorization": "Bearer "},
        {"X-Grafana-Org-Id": "2"},
    ],
)
async def test_no_credentials_is_none(grafana: Grafana, headers: dict[str, str]) -> None:
    assert await authenticator(grafana).authenticate(request(headers)) is None
    assert not grafana.fake.calls


# --- grafana mode: when Grafana fails ---------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(500, 502), (503, 502), (302, 502), (403, 403)])
async def test_grafana_errors_are_not_401(grafana: Grafana, status: int, code: int) -> None:
    grafana.fake.status = status
    with pytest.raises(StatusError) as caught:
        await authenticator(grafana).authenticate(
            request({"Authorization": basic("bob", "secret")})
        )
    assert caught.value.code == code


async def test_grafana_unreachable_is_503() -> None:
    async with aiohttp.ClientSession() as session:
        # A port nothing listens on: bind one, learn it, release it.
        server = TestServer(web.Application(), host="127.0.0.1")
        await server.start_server()
        base = str(server.make_url(""))
        await server.close()
        auth = GrafanaAuthenticator(http_fetch(session, base), AuthSettings())
        with pytest.raises(StatusError) as caught:
            await auth.authenticate(request({"Authorization": basic("bob", "secret")}))
    assert caught.value.code == 503
    assert caught.value.retry_after is not None
    assert "unreachable" in caught.value.message


async def test_grafana_too_slow_is_503(grafana: Grafana) -> None:
    grafana.fake.gate = asyncio.Event()  # never opened
    auth = authenticator(grafana, timeout=0.05)
    with pytest.raises(StatusError) as caught:
        await auth.authenticate(request({"Authorization": basic("bob", "secret")}))
    assert caught.value.code == 503


async def test_malformed_answer_is_502() -> None:
    async def fetch(path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        return 200, ["not", "an", "object"]

    with pytest.raises(StatusError) as caught:
        await GrafanaAuthenticator(fetch, AuthSettings()).authenticate(
            request({"Authorization": basic("bob", "secret")})
        )
    assert caught.value.code == 502


async def test_status_errors_from_the_delegate_pass_through() -> None:
    async def fetch(path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        raise StatusError(503, "delegate circuit open", retry_after=5)

    with pytest.raises(StatusError) as caught:
        await GrafanaAuthenticator(fetch, AuthSettings()).authenticate(
            request({"Authorization": basic("bob", "secret")})
        )
    assert (caught.value.code, caught.value.message) == (503, "delegate circuit open")


# --- grafana mode: the cache -----------------------------------------------------------------


async def test_cache_hit_miss_and_expiry(grafana: Grafana) -> None:
    clock = Clock()
    auth = authenticator(grafana, clock, cache_ttl=10)
    bob = request({"Authorization": basic("bob", "secret")})
    first = await auth.authenticate(bob)
    clock.now += 9.9
    assert await auth.authenticate(bob) == first
    assert grafana.fake.calls["/api/user"] == 1
    clock.now += 0.2
    assert await auth.authenticate(bob) == first
    assert grafana.fake.calls["/api/user"] == 2


async def test_cache_is_keyed_by_credential_and_org(grafana: Grafana) -> None:
    auth = authenticator(grafana)
    ann = {"Cookie": "grafana_session=sess-ann"}
    in_org_1 = await auth.authenticate(request(ann))
    in_org_3 = await auth.authenticate(request({**ann, "X-Grafana-Org-Id": "3"}))
    assert in_org_1 is not None and in_org_3 is not None
    assert (in_org_1.org_id, in_org_1.role) == (1, OrgRole.EDITOR)
    assert (in_org_3.org_id, in_org_3.role) == (3, OrgRole.ADMIN)
    assert len(auth.cache_keys) == 2


async def test_cache_never_holds_the_credential(grafana: Grafana) -> None:
    auth = authenticator(grafana)
    await auth.authenticate(request({"Authorization": f"Bearer {SA_TOKEN}"}))
    (key,) = auth.cache_keys
    assert SA_TOKEN.encode() not in key
    assert len(key) == 32
    # Not a plain hash either, which could be checked against guessed passwords offline.
    for material in (SA_TOKEN, f"Bearer {SA_TOKEN}", f"Authorization:Bearer {SA_TOKEN}"):
        assert key != hashlib.sha256(material.encode()).digest()
    assert SA_TOKEN not in repr(auth.__dict__)


async def test_cache_is_bounded(grafana: Grafana) -> None:
    auth = authenticator(grafana, cache_size=2)
    for headers in (
        {"Authorization": basic("bob", "secret")},
        {"Authorization": basic("root", "toor")},
        {"Cookie": "grafana_session=sess-ann"},
    ):
        await auth.authenticate(request(headers))
    assert len(auth.cache_keys) == 2
    await auth.authenticate(request({"Authorization": basic("bob", "secret")}))  # evicted first
    assert grafana.fake.calls["/api/user"] == 4


async def test_cache_disabled_and_failures_never_cached(grafana: Grafana) -> None:
    auth = authenticator(grafana, cache_ttl=0)
    for _ in range(2):
        await auth.authenticate(request({"Authorization": basic("bob", "secret")}))
        with pytest.raises(StatusError):
            await auth.authenticate(request({"Authorization": basic("bob", "nope")}))
    assert grafana.fake.calls["/api/user"] == 4
    assert auth.cache_keys == ()


async def test_concurrent_misses_share_one_lookup(grafana: Grafana) -> None:
    grafana.fake.gate = asyncio.Event()
    auth = authenticator(grafana)
    bob = {"Authorization": basic("bob", "secret")}
    tasks = [asyncio.create_task(auth.authenticate(request(bob))) for _ in range(8)]
    await grafana.fake.arrived.wait()
    grafana.fake.gate.set()
    results = await asyncio.gather(*tasks)
    assert len({r for r in results}) == 1
    assert grafana.fake.calls == Counter({"/api/user": 1, "/api/user/orgs": 1})


async def test_a_cancelled_first_caller_does_not_fail_the_others(grafana: Grafana) -> None:
    grafana.fake.gate = asyncio.Event()
    auth = authenticator(grafana)
    bob = {"Authorization": basic("bob", "secret")}
    leader = asyncio.create_task(auth.authenticate(request(bob)))
    await grafana.fake.arrived.wait()
    follower = asyncio.create_task(auth.authenticate(request(bob)))
    await asyncio.sleep(0)  # let the follower start waiting on the shared lookup
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    grafana.fake.gate.set()
    who = await follower
    assert who is not None and who.login == "bob"


# --- token mode ------------------------------------------------------------------------------


TOKENS = """\
tok-alice,alice,u-1,"dev,ops"
tok-bob,bob,u-2

tok-carol,carol,u-3,admins,ignored-extra-column
tok-dave,dave,u-4
,nobody,u-5
"""

GRANTS = {
    "bob": OrgGrant(org_id=1, role=OrgRole.ADMIN, server_admin=True),
    "group:dev": OrgGrant(org_id=2, role=OrgRole.VIEWER),
    "group:ops": OrgGrant(org_id=2, role=OrgRole.EDITOR),
    "group:admins": OrgGrant(org_id=1, role=OrgRole.ADMIN),
}


def token_file(tmp_path: Path, text: str = TOKENS) -> Path:
    path = tmp_path / "tokens.csv"
    path.write_text(text)
    path.chmod(0o600)
    return path


def bump(path: Path, text: str) -> None:
    """Rewrite a file so its stamp certainly changes, however coarse the clock."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.mark.parametrize(
    ("token", "login", "uid", "org_id", "role", "admin"),
    [
        ("tok-alice", "alice", "u-1", 2, OrgRole.EDITOR, False),  # highest of dev, ops
        ("tok-bob", "bob", "u-2", 1, OrgRole.ADMIN, True),  # own entry
        ("tok-carol", "carol", "u-3", 1, OrgRole.ADMIN, False),
        ("tok-dave", "dave", "u-4", 1, OrgRole.NONE, False),  # valid, no grant
    ],
)
async def test_token_mode_identities(
    tmp_path: Path, token: str, login: str, uid: str, org_id: int, role: OrgRole, admin: bool
) -> None:
    auth = TokenAuthenticator(token_file(tmp_path), grants=GRANTS)
    who = await auth.authenticate(request({"Authorization": f"Bearer {token}"}))
    assert who == Identity(
        login=login,
        name=login,
        email="",
        org_id=org_id,
        role=role,
        is_server_admin=admin,
        uid=uid,
        auth_method="token",
    )


async def test_token_mode_first_group_picks_the_org(tmp_path: Path) -> None:
    path = token_file(tmp_path, 'tok,erin,u-9,"ops,admins,dev"\n')
    auth = TokenAuthenticator(path, grants=GRANTS)
    who = auth.authenticate_headers({"Authorization": "Bearer tok"})
    assert who is not None and (who.org_id, who.role) == (2, OrgRole.EDITOR)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Authorization": "Bearer tok-nobody"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": basic("alice", "tok-alice")}, 401),
    ],
)
async def test_token_mode_refusals(tmp_path: Path, headers: dict[str, str], code: int) -> None:
    auth = TokenAuthenticator(token_file(tmp_path), grants=GRANTS)
    with pytest.raises(StatusError) as caught:
        await auth.authenticate(request(headers))
    assert caught.value.code == code


async def test_token_mode_without_credentials_is_none(tmp_path: Path) -> None:
    auth = TokenAuthenticator(token_file(tmp_path), grants=GRANTS)
    assert await auth.authenticate(request({"Cookie": "grafana_session=x"})) is None


async def test_token_file_reloads_and_keeps_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = token_file(tmp_path)
    clock = Clock()
    auth = TokenAuthenticator(path, grants=GRANTS, reload_interval=1.0, clock=clock)
    assert auth.authenticate_headers({"Authorization": "Bearer tok-bob"}) is not None

    bump(path, "tok-new,newbie,u-7\n")
    # Within the interval the old file still answers.
    assert auth.authenticate_headers({"Authorization": "Bearer tok-bob"}) is not None
    clock.now += 1.0
    who = auth.authenticate_headers({"Authorization": "Bearer tok-new"})
    assert who is not None and who.login == "newbie"
    with pytest.raises(StatusError):
        auth.authenticate_headers({"Authorization": "Bearer tok-bob"})

    caplog.set_level(logging.ERROR, logger="bridge.tokenfile")
    bump(path, "broken,record\n")
    for _ in range(3):
        clock.now += 1.0
        who = auth.authenticate_headers({"Authorization": "Bearer tok-new"})
        assert who is not None and who.login == "newbie"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "tokens.csv:1" in errors[0].getMessage()

    path.unlink()
    clock.now += 1.0
    assert auth.authenticate_headers({"Authorization": "Bearer tok-new"}) is not None


def test_parse_token_file_rules() -> None:
    users = parse_token_file(TOKENS)
    assert len(users) == 4  # the record with an empty token is skipped
    alice = users[hashlib.sha256(b"tok-alice").digest()]
    assert (alice.name, alice.uid, alice.groups) == ("alice", "u-1", ("dev", "ops"))
    carol = users[hashlib.sha256(b"tok-carol").digest()]
    assert carol.groups == ("admins",)
    # Only digests are kept.
    assert all(b"tok-" not in key for key in users)
    later = parse_token_file("t,first,u1\nt,second,u2\n")
    assert [u.name for u in later.values()] == ["second"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("ok,a,b\nonly,two\n", "tokens.csv:2"),
        ('bad,"unterminated\n', "tokens.csv:"),
    ],
)
def test_token_file_errors_name_the_line(text: str, where: str) -> None:
    with pytest.raises(TokenFileError, match=where):
        parse_token_file(text, path="tokens.csv")


def test_token_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read token file"):
        TokenAuthenticator(tmp_path / "missing.csv", grants={})


def test_token_mode_settings() -> None:
    with pytest.raises(ValidationError, match="token_file"):
        AuthSettings(mode="token")
    with pytest.raises(ValidationError, match="group:<name>"):
        AuthSettings(users={"group:": OrgGrant()})
    with pytest.raises(ValidationError):
        AuthSettings(mode="kerberos")
    with pytest.raises(ValidationError):
        AuthSettings(cache_ttl=-1)
    settings = AuthSettings.model_validate(
        {
            "mode": "token",
            "token_file": "/x.csv",
            "users": {"group:ops": {"org_id": 2, "role": "editor"}},
        }
    )
    assert settings.users["group:ops"].role is OrgRole.EDITOR


# --- anonymous and composition ----------------------------------------------------------------


async def test_anonymous_mode_ignores_credentials() -> None:
    auth = build_authenticator(
        AuthSettings(mode="anonymous", anonymous=AnonymousSettings(org_id=2, role=OrgRole.EDITOR))
    )
    who = await auth.authenticate(request({"Authorization": basic("x", "y")}))
    assert who is not None
    assert (who.org_id, who.role, who.is_anonymous, who.login) == (2, OrgRole.EDITOR, True, "")


async def test_anonymous_only_when_enabled(grafana: Grafana) -> None:
    closed = build_authenticator(AuthSettings(), fetch=grafana.fetch)
    assert await closed.authenticate(request()) is None
    with pytest.raises(StatusError) as caught:
        await require_identity(closed, request())
    assert caught.value.code == 401
    assert "session cookie" in caught.value.message

    open_ = build_authenticator(
        AuthSettings(anonymous=AnonymousSettings(enabled=True)), fetch=grafana.fetch
    )
    who = await require_identity(open_, request())
    assert who.is_anonymous and who.role is OrgRole.VIEWER
    # Bad credentials are still refused, never downgraded to anonymous.
    with pytest.raises(StatusError) as caught:
        await open_.authenticate(request({"Cookie": "grafana_session=stolen"}))
    assert caught.value.code == 401
    real = await open_.authenticate(request({"Authorization": basic("bob", "secret")}))
    assert real is not None and real.login == "bob"


async def test_build_authenticator_token_mode(tmp_path: Path) -> None:
    auth = build_authenticator(
        AuthSettings(mode="token", token_file=token_file(tmp_path), users=GRANTS)
    )
    who = await auth.authenticate(request({"Authorization": "Bearer tok-carol"}))
    assert who is not None and who.login == "carol"


def test_grafana_mode_needs_fetch() -> None:
    with pytest.raises(ValueError, match="delegate"):
        build_authenticator(AuthSettings())


# --- namespace authorization -----------------------------------------------------------------


def who(org_id: int, role: OrgRole, *, admin: bool = False, anonymous: bool = False) -> Identity:
    return Identity(
        login="" if anonymous else "ann",
        name="",
        email="",
        org_id=org_id,
        role=role,
        is_server_admin=admin,
        auth_method="anonymous" if anonymous else "session",
    )


NAMESPACE_CASES = [
    # org, role, namespace -> org id, or the Status code
    (1, OrgRole.VIEWER, "default", 1),
    (1, OrgRole.NONE, "default", 1),  # roles are checked per endpoint, not here
    (1, OrgRole.ADMIN, "org-2", 403),
    (1, OrgRole.EDITOR, "stacks-12", 1),
    (1, OrgRole.EDITOR, "stack-12", 1),
    (2, OrgRole.VIEWER, "org-2", 2),
    (2, OrgRole.ADMIN, "default", 403),
    (2, OrgRole.EDITOR, "org-3", 403),
    (2, OrgRole.EDITOR, "stacks-2", 403),  # stacks run as org 1
    (5, OrgRole.ADMIN, "org-1", 400),
    (1, OrgRole.ADMIN, "org-01", 400),
    (1, OrgRole.ADMIN, "kube-system", 400),
]


@pytest.mark.parametrize(("org_id", "role", "namespace", "expected"), NAMESPACE_CASES)
def test_namespace_must_be_the_callers_org(
    org_id: int, role: OrgRole, namespace: str, expected: int
) -> None:
    identity = who(org_id, role)
    if expected in (400, 403):
        with pytest.raises(StatusError) as caught:
            authorize_namespace(identity, namespace)
        assert caught.value.code == expected
    else:
        assert authorize_namespace(identity, namespace) == expected


def test_server_admins_do_not_skip_the_namespace_check() -> None:
    with pytest.raises(StatusError) as caught:
        authorize_namespace(who(1, OrgRole.ADMIN, admin=True), "org-5")
    assert caught.value.code == 403
    assert "X-Grafana-Org-Id" in caught.value.message
    assert "org 5" in caught.value.message and "org 1" in caught.value.message


def test_anonymous_namespace_message() -> None:
    with pytest.raises(StatusError) as caught:
        authorize_namespace(who(1, OrgRole.VIEWER, anonymous=True), "org-3")
    assert "anonymous access" in caught.value.message
    assert "X-Grafana-Org-Id" not in caught.value.message


# --- what reaches plugins --------------------------------------------------------------------


def test_forwardable_headers_keep_only_what_grafana_forwards() -> None:
    headers = CIMultiDict(
        [
            ("Cookie", "grafana_session=s3cr3t; a=1; b=2"),
            ("Cookie", "grafana_session_expiry=99; c=3"),
            ("Authorization", basic("bob", "secret")),
            ("X-Grafana-User", "mallory"),
            ("X-Panel-Id", "4"),
            ("X-Dashboard-Uid", "dash"),
            ("X-Grafana-Org-Id", "1"),
            ("X-Random", "nope"),
        ]
    )
    json_data = {"keepCookies": ["a", "c", "grafana_session", "grafana_session_expiry"]}
    forwarded = forwardable_headers(headers, identity=who(1, OrgRole.VIEWER), json_data=json_data)
    assert forwarded == {
        "X-Panel-Id": "4",
        "X-Dashboard-Uid": "dash",
        "X-Grafana-Org-Id": "1",
        "X-Grafana-User": "ann",
        "Cookie": "a=1; c=3",
    }
    assert query_headers(forwarded)["http_Cookie"] == "a=1; c=3"
    assert set(query_headers(forwarded)) == {f"http_{k}" for k in forwarded}


def test_no_cookies_without_keep_cookies_and_no_user_for_anonymous() -> None:
    headers = {"Cookie": "a=1", "X-Grafana-User": "mallory"}
    assert forwardable_headers(headers, identity=who(1, OrgRole.VIEWER, anonymous=True)) == {}
    assert forwardable_headers(headers, identity=None, json_data={"keepCookies": "a"}) == {}


def test_authorization_only_for_oauth_pass_through_and_never_the_callers() -> None:
    headers = {"Authorization": f"Bearer {SA_TOKEN}"}
    identity = who(1, OrgRole.VIEWER)
    assert "Authorization" not in forwardable_headers(
        headers, identity=identity, json_data={"oauthPassThru": True}
    )
    assert "Authorization" not in forwardable_headers(
        headers, identity=identity, json_data={}, oauth_authorization="Bearer idp-token"
    )
    forwarded = forwardable_headers(
        headers,
        identity=identity,
        json_data={"oauthPassThru": True},
        oauth_authorization="Bearer idp-token",
        oauth_id_token="id-token",
    )
    assert (forwarded["Authorization"], forwarded["X-ID-Token"]) == ("Bearer idp-token", "id-token")


def test_credential_headers() -> None:
    headers = CIMultiDict(
        [
            ("Cookie", "a=1; grafana_session=s; grafana_session=later"),
            ("X-Grafana-Org-Id", "2"),
            ("Authorization", "Digest x"),
            ("User-Agent", "curl"),
        ]
    )
    assert credential_headers(headers) == {"Cookie": "grafana_session=s", "X-Grafana-Org-Id": "2"}
    assert credential_headers({"Cookie": "sid=1"}, session_cookie="sid") == {"Cookie": "sid=1"}
    assert credential_headers({"X-Grafana-Org-Id": "2"}) == {}


async def test_fetch_helper_type_checks(grafana: Grafana) -> None:
    fetch: Callable[[str, Mapping[str, str]], Awaitable[tuple[int, Any]]] = grafana.fetch
    status, body = await fetch("/api/user", {"Authorization": basic("bob", "secret")})
    assert status == 200 and body["login"] == "bob"


async def test_no_delegate_configured_is_503_not_404() -> None:
    async def fetch(path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        raise StatusError(404, "no delegate is configured")

    with pytest.raises(StatusError) as caught:
        await GrafanaAuthenticator(fetch, AuthSettings()).authenticate(
            request({"Authorization": basic("bob", "secret")})
        )
    assert caught.value.code == 503
    assert "no delegate" in caught.value.message


async def test_with_the_real_delegate() -> None:
    """The adapter the bridge uses: Delegate.fetch_json behind a (path, headers) lambda."""
    fake = FakeGrafana()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with Delegate(DelegateSettings(url=str(server.make_url("")))) as delegate:
            settings = AuthSettings()
            auth = build_authenticator(
                settings,
                fetch=lambda path, headers: delegate.fetch_json(
                    path, headers=headers, timeout=settings.timeout
                ),
            )
            who = await auth.authenticate(
                request({"Cookie": "grafana_session=sess-ann", "X-Grafana-Org-Id": "3"})
            )
            assert who is not None and (who.login, who.org_id, who.role) == (
                "ann",
                3,
                OrgRole.ADMIN,
            )
            with pytest.raises(StatusError) as caught:
                await auth.authenticate(request({"Cookie": "grafana_session=stolen"}))
            assert caught.value.code == 401
    finally:
        await server.close()
