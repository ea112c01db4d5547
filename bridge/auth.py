"""Authentication: the caller's own Grafana credentials, a static token file, or anonymous.

Three modes (``AuthSettings.mode``), all answering "who is calling, in which org, with which
role" as an ``Identity`` built from the current request only:

* ``grafana`` (default): the caller's session cookie, basic auth, API key or service account
  token is sent to the delegate Grafana's ``/api/user`` and ``/api/user/orgs``; Grafana decides.
  Answers are cached briefly under a keyed hash of the credential, never the credential.
* ``token``: a kube-apiserver static token file plus a mapping of users and groups to org/role,
  for running without Grafana (bridge/tokenfile.py).
* ``anonymous``: everyone is the configured anonymous identity. ``anonymous.enabled`` also lets
  the other two modes admit requests that carry no credentials at all.

``authorize_namespace`` ties the URL's namespace to the caller's org; ``forwardable_headers``
decides which request headers may reach a plugin (see docs/identity-and-context.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bridge.identity import Identity, OrgRole, namespace_for_org, parse_namespace
from bridge.status import StatusError
from bridge.tls import peer_subject
from bridge.tokenfile import (
    OrgGrant,
    TokenAuthenticator,
    TokenFileError,
    grant_for,
    parse_token_file,
)

__all__ = [
    "AnonymousAuthenticator",
    "AnonymousSettings",
    "AuthSettings",
    "Authenticator",
    "ClientCertAuthenticator",
    "Fetch",
    "GrafanaAuthenticator",
    "OrgGrant",
    "TokenAuthenticator",
    "TokenFileError",
    "authorize_namespace",
    "build_authenticator",
    "credential_headers",
    "forwardable_headers",
    "grant_for",
    "parse_token_file",
    "query_headers",
    "require_identity",
]

log = logging.getLogger(__name__)

AuthMode = Literal["grafana", "token", "anonymous"]

# fetch(path, headers) -> (HTTP status, parsed JSON body or None); bridge/delegate.py provides it.
Fetch = Callable[[str, Mapping[str, str]], Awaitable[tuple[int, Any]]]

ORG_HEADER = "X-Grafana-Org-Id"
_ORG_ID = re.compile(r"[1-9][0-9]{0,18}")
# Identities that /api/user describes but that are not users (no org list, no user id).
_NON_USER_KINDS = {"service-account": "service_account", "api-key": "api_key"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnonymousSettings(_Section):
    enabled: bool = False
    org_id: int = Field(default=1, ge=1)
    role: OrgRole = OrgRole.VIEWER


class AuthSettings(_Section):
    """The ``auth`` section. Keys are documented in docs/identity-and-context.md."""

    mode: AuthMode = "grafana"

    # grafana mode
    cache_ttl: float = Field(default=10.0, ge=0)
    cache_size: int = Field(default=1024, ge=0)
    user_path: str = "/api/user"
    orgs_path: str = "/api/user/orgs"
    timeout: float = Field(default=5.0, gt=0)
    session_cookie: str = Field(default="grafana_session", min_length=1)
    # Grafana tells nobody but an org admin the role of a service account or API key.
    service_account_role: OrgRole = OrgRole.NONE

    # token mode: keys are user names, or "group:<name>" for a group from the token file.
    token_file: Path | None = None
    users: dict[str, OrgGrant] = Field(default_factory=dict)
    token_reload_interval: float = Field(default=2.0, ge=0)

    anonymous: AnonymousSettings = AnonymousSettings()

    @model_validator(mode="after")
    def _check_mode(self) -> AuthSettings:
        if self.mode == "token" and self.token_file is None:
            raise ValueError("auth.mode 'token' needs auth.token_file (a kube-apiserver token CSV)")
        for key in ("user_path", "orgs_path"):
            if not getattr(self, key).startswith("/"):
                raise ValueError(f"auth.{key} must be an absolute path such as /api/user")
        for name in self.users:
            if not name or name == "group:":
                raise ValueError("auth.users: keys must be a user name or group:<name>")
        return self


class Authenticator(Protocol):
    """Answers who sent a request; ``None`` means it carried no credentials."""

    async def authenticate(self, request: web.Request) -> Identity | None: ...


async def require_identity(authenticator: Authenticator, request: web.Request) -> Identity:
    """``authenticate``, with "no credentials" turned into a 401."""
    # Authorization is a singleton field (RFC 9110 §11.6.2): two of them are ambiguous (a proxy
    # in front may have checked the other one), so refuse rather than pick one.
    if len(request.headers.getall("Authorization", [])) > 1:
        raise StatusError(400, "more than one Authorization header")
    identity = await authenticator.authenticate(request)
    if identity is None:
        hint = getattr(authenticator, "credentials_hint", "credentials")
        raise StatusError(401, f"authentication required: send {hint}")
    return identity


def build_authenticator(settings: AuthSettings, *, fetch: Fetch | None = None) -> Authenticator:
    """The authenticator for ``settings.mode``, with the anonymous fallback when enabled."""
    # A verified client certificate (server.client_ca) comes first, as in kube-apiserver.
    return ClientCertAuthenticator(_primary_authenticator(settings, fetch), settings.users)


def _primary_authenticator(settings: AuthSettings, fetch: Fetch | None) -> Authenticator:
    primary: Authenticator
    if settings.mode == "anonymous":
        return AnonymousAuthenticator(settings.anonymous)
    if settings.mode == "grafana":
        if fetch is None:
            raise ValueError("auth.mode 'grafana' needs a way to call the delegate Grafana")
        primary = GrafanaAuthenticator(fetch, settings)
    elif settings.token_file is None:
        raise ValueError("auth.mode 'token' needs auth.token_file")
    else:
        primary = TokenAuthenticator(
            settings.token_file,
            grants=settings.users,
            reload_interval=settings.token_reload_interval,
        )
    if settings.anonymous.enabled:
        return _AnonymousFallback(primary, AnonymousAuthenticator(settings.anonymous))
    return primary


# --- grafana mode ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Credentials:
    headers: dict[str, str]
    method: str
    requested_org: int | None


def credential_headers(
    headers: Mapping[str, str], *, session_cookie: str = "grafana_session"
) -> dict[str, str]:
    """The headers that prove who the caller is to Grafana, and nothing else.

    ``Cookie`` keeps only the session cookie and its ``_expiry`` companion; ``Authorization``
    only the Basic and Bearer schemes (API keys and service account tokens are Bearer);
    ``X-Grafana-Org-Id`` picks the org, as in Grafana. Empty when there is no credential.
    """
    found = _credentials(headers, session_cookie=session_cookie)
    return dict(found.headers) if found is not None else {}


def _credentials(headers: Mapping[str, str], *, session_cookie: str) -> _Credentials | None:
    forwarded: dict[str, str] = {}
    method = ""
    authorization = _first(headers, "authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() in ("basic", "bearer") and value.strip():
            forwarded["Authorization"] = f"{scheme.capitalize()} {value.strip()}"
            method = scheme.lower()
    cookies = [
        (name, value)
        for name, value in _cookies(headers)
        if name in (session_cookie, f"{session_cookie}_expiry")
    ]
    if any(name == session_cookie for name, _ in cookies):
        forwarded["Cookie"] = "; ".join(f"{name}={value}" for name, value in _dedupe(cookies))
        method = method or "session"
    if not forwarded:
        return None
    requested_org: int | None = None
    org = _first(headers, ORG_HEADER.lower())
    if org is not None and org.strip():
        text = org.strip()
        if not _ORG_ID.fullmatch(text):
            raise StatusError(400, f"{ORG_HEADER} must be a positive org id, got {text!r}")
        requested_org = int(text)
        forwarded[ORG_HEADER] = str(requested_org)
    return _Credentials(headers=forwarded, method=method, requested_org=requested_org)


class GrafanaAuthenticator:
    """Checks the caller's own credentials against the delegate Grafana's user API.

    ``GET /api/user`` names the caller (login, name, email, uid, ``isGrafanaAdmin`` and, for
    users, their active org). ``GET /api/user/orgs`` lists a user's orgs with the role in
    each; the request's org is ``X-Grafana-Org-Id`` when sent, else the active org. Service
    accounts and API keys have no org list (Grafana answers "Endpoint only available for
    users"), so they run in their own org with ``service_account_role``.

    Answers are cached for ``cache_ttl`` seconds in a bounded LRU keyed by HMAC-SHA256 of the
    credential headers under a per-process random key, so neither the credential nor an
    offline-guessable plain hash of it is ever kept. Concurrent misses for one credential
    share a single lookup. Grafana's 401 is our 401; Grafana unreachable is 503, a broken
    answer 502, so an outage never looks like bad credentials.
    """

    credentials_hint = (
        "a Grafana session cookie, basic auth, or an API key or service account token "
        "(Authorization: Bearer)"
    )

    def __init__(
        self,
        fetch: Fetch,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._settings = settings
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Identity]] = {}

    @property
    def cache_keys(self) -> tuple[bytes, ...]:
        """The cache's keys, oldest first (for diagnostics and tests)."""
        return tuple(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    async def authenticate(self, request: web.Request) -> Identity | None:
        return await self.authenticate_headers(request.headers)

    async def authenticate_headers(self, headers: Mapping[str, str]) -> Identity | None:
        credentials = _credentials(headers, session_cookie=self._settings.session_cookie)
        if credentials is None:
            return None
        key = self._cache_key(credentials.headers)
        cached = self._cached(key)
        if cached is not None:
            return cached
        return await self._lookup_once(key, credentials)

    def _cache_key(self, headers: Mapping[str, str]) -> bytes:
        material = "\n".join(f"{name}:{value}" for name, value in sorted(headers.items()))
        return hmac.new(self._secret, material.encode(), hashlib.sha256).digest()

    def _cached(self, key: bytes) -> Identity | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, identity = entry
        if self._clock() >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return identity

    def _store(self, key: bytes, identity: Identity) -> None:
        if self._settings.cache_ttl <= 0 or self._settings.cache_size <= 0:
            return
        self._cache[key] = (self._clock() + self._settings.cache_ttl, identity)
        self._cache.move_to_end(key)
        while len(self._cache) > self._settings.cache_size:
            self._cache.popitem(last=False)

    async def _lookup_once(self, key: bytes, credentials: _Credentials) -> Identity:
        # A dashboard opening fires many panel queries at once: one Grafana round trip serves all.
        while (shared := self._inflight.get(key)) is not None:
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                if shared.cancelled() and not _being_cancelled():
                    continue  # the first caller went away, not us: look it up ourselves
                raise
        future: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            identity = await self._lookup(credentials)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # whoever waits re-raises it; nobody waiting is fine too
            raise
        else:
            future.set_result(identity)
            self._store(key, identity)
            return identity
        finally:
            del self._inflight[key]

    async def _lookup(self, credentials: _Credentials) -> Identity:
        s = self._settings
        status, body = await self._call(s.user_path, credentials.headers)
        self._check_status(status, s.user_path)
        profile = _mapping(body, s.user_path)
        login = _text(profile, "login", s.user_path)
        uid = _text(profile, "uid", s.user_path)
        active_org = profile.get("orgId")
        if not isinstance(active_org, int) or isinstance(active_org, bool) or active_org < 1:
            raise StatusError(502, f"Grafana's {s.user_path} answer has no valid orgId")
        is_admin = profile.get("isGrafanaAdmin") is True
        base = Identity(
            login=login,
            name=_text(profile, "name", s.user_path),
            email=_text(profile, "email", s.user_path),
            org_id=active_org,
            role=OrgRole.NONE,
            is_server_admin=is_admin,
            uid=uid,
            auth_method=credentials.method,
        )
        kind = uid.partition(":")[0] if ":" in uid else ""
        if kind in _NON_USER_KINDS:
            return self._non_user(base, credentials, _NON_USER_KINDS[kind])

        status, body = await self._call(s.orgs_path, credentials.headers)
        if status in (304, 403):
            # Older Grafana lets /api/user through for service accounts but not this one.
            return self._non_user(base, credentials, "service_account")
        self._check_status(status, s.orgs_path)
        roles = _org_roles(body, s.orgs_path)
        org_id = credentials.requested_org or active_org
        role = roles.get(org_id)
        if role is None:
            if credentials.requested_org is not None:
                raise StatusError(
                    403, f"user {login!r} is not a member of org {org_id} ({ORG_HEADER})"
                )
            role = OrgRole.NONE
        return Identity(
            login=base.login,
            name=base.name,
            email=base.email,
            org_id=org_id,
            role=role,
            is_server_admin=is_admin,
            uid=uid,
            auth_method=credentials.method,
        )

    def _non_user(self, base: Identity, credentials: _Credentials, method: str) -> Identity:
        if credentials.requested_org not in (None, base.org_id):
            raise StatusError(
                403,
                f"{base.login or 'this service account'} belongs to org {base.org_id}, "
                f"not org {credentials.requested_org} ({ORG_HEADER})",
            )
        return Identity(
            login=base.login,
            name=base.name,
            email=base.email,
            org_id=base.org_id,
            role=self._settings.service_account_role,
            is_server_admin=base.is_server_admin,
            uid=base.uid,
            auth_method=method,
        )

    async def _call(self, path: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        try:
            async with asyncio.timeout(self._settings.timeout):
                return await self._fetch(path, headers)
        except StatusError as exc:
            if exc.code < 500:
                # e.g. the delegate's 404 "no delegate is configured": not the caller's fault.
                raise StatusError(
                    503, f"cannot check credentials: {exc.message}", retry_after=exc.retry_after
                ) from None
            raise
        except TimeoutError:
            log.warning("Grafana did not answer %s within %ss", path, self._settings.timeout)
            raise StatusError(
                503, "Grafana did not answer in time; cannot check credentials", retry_after=1.0
            ) from None
        except Exception as exc:
            log.warning("cannot reach Grafana for %s: %s: %s", path, type(exc).__name__, exc)
            raise StatusError(
                503, "Grafana is unreachable; cannot check credentials", retry_after=1.0
            ) from None

    @staticmethod
    def _check_status(status: int, path: str) -> None:
        if status == 200:
            return
        if status in (401, 404):
            # 404: a session or token whose user has since been deleted.
            raise StatusError(401, "Grafana did not accept the credentials")
        if status == 403:
            raise StatusError(403, f"Grafana refused to describe the caller ({path})")
        if status >= 500:
            raise StatusError(502, f"Grafana answered {status} to {path}")
        raise StatusError(502, f"unexpected answer {status} from Grafana's {path}")


def _org_roles(body: Any, path: str) -> dict[int, OrgRole]:
    if not isinstance(body, list):
        raise StatusError(502, f"Grafana's {path} answer is not a list")
    roles: dict[int, OrgRole] = {}
    for entry in body:
        if not isinstance(entry, dict):
            raise StatusError(502, f"Grafana's {path} answer has a malformed entry")
        org_id, role = entry.get("orgId"), entry.get("role")
        if not isinstance(org_id, int) or not isinstance(role, str):
            raise StatusError(502, f"Grafana's {path} answer has an entry without orgId/role")
        try:
            roles[org_id] = OrgRole(role)
        except ValueError:
            raise StatusError(502, f"Grafana's {path} names an unknown role {role!r}") from None
    return roles


def _mapping(body: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise StatusError(502, f"Grafana's {path} answer is not a JSON object")
    return body


def _text(profile: Mapping[str, Any], key: str, path: str) -> str:
    value = profile.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise StatusError(502, f"Grafana's {path} answer has a non-string {key!r}")
    return value


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# --- anonymous -------------------------------------------------------------------------------


class AnonymousAuthenticator:
    """Everyone is the configured anonymous identity (Grafana's ``[auth.anonymous]``)."""

    credentials_hint = "nothing (anonymous access)"

    def __init__(self, settings: AnonymousSettings) -> None:
        self._identity = Identity(
            login="",
            name="",
            email="",
            org_id=settings.org_id,
            role=settings.role,
            auth_method="anonymous",
        )

    async def authenticate(self, request: web.Request) -> Identity | None:
        return self._identity


class _AnonymousFallback:
    """The primary authenticator; requests without any credentials become anonymous."""

    def __init__(self, primary: Authenticator, anonymous: AnonymousAuthenticator) -> None:
        self._primary = primary
        self._anonymous = anonymous
        self.credentials_hint = getattr(primary, "credentials_hint", "credentials")

    async def authenticate(self, request: web.Request) -> Identity | None:
        identity = await self._primary.authenticate(request)
        if identity is not None:
            return identity
        return await self._anonymous.authenticate(request)


# --- client certificates --------------------------------------------------------------------


class ClientCertAuthenticator:
    """A verified TLS client certificate names the caller; otherwise ``fallback`` decides.

    As kube-apiserver reads one: the subject's CN is the login and each O a group; org and
    role come from ``auth.users`` exactly as for a token-file user. The listener verifies
    certificates only when ``server.client_ca`` is set, and Python reports a peer certificate
    only once it is verified, so without a client CA this always defers to ``fallback``.
    """

    def __init__(self, fallback: Authenticator, grants: Mapping[str, OrgGrant]) -> None:
        self._fallback = fallback
        self._grants = dict(grants)
        self.credentials_hint = getattr(fallback, "credentials_hint", "credentials")

    @property
    def fallback(self) -> Authenticator:
        return self._fallback

    def identify(self, peercert: Any) -> Identity | None:
        subject = peer_subject(peercert)
        if subject is None:
            return None
        login, groups = subject
        grant = grant_for(self._grants, login, groups)
        return Identity(
            login=login,
            name=login,
            email="",
            org_id=grant.org_id,
            role=grant.role,
            is_server_admin=grant.server_admin,
            auth_method="x509",
        )

    async def authenticate(self, request: web.Request) -> Identity | None:
        transport = request.transport
        if transport is not None:
            identity = self.identify(transport.get_extra_info("peercert"))
            if identity is not None:
                return identity
        return await self._fallback.authenticate(request)


# --- authorization and forwarding ------------------------------------------------------------


def authorize_namespace(identity: Identity, namespace: str) -> int:
    """The org id for a request to ``namespace``, which must be the caller's own org.

    Upstream lets Grafana server admins skip this check while still running them in their
    session's org, so a query to ``org-5`` could read org 1's datasources. Here nobody skips
    it: the namespace and the plugin context's org never disagree. A server admin works in
    another org the way Grafana's own API does, by sending ``X-Grafana-Org-Id``.
    """
    org_id = parse_namespace(namespace)
    if org_id != identity.org_id:
        who = "anonymous access" if identity.is_anonymous else f"user {identity.login!r}"
        hint = "" if identity.is_anonymous else f" (select another org with {ORG_HEADER})"
        raise StatusError(
            403,
            f"namespace {namespace!r} belongs to org {org_id}, but {who} works in org "
            f"{identity.org_id} (namespace {namespace_for_org(identity.org_id)!r}){hint}",
        )
    return org_id


# Headers Grafana copies from the incoming request onto plugin calls (tracing middleware).
TRACING_HEADERS = (
    "X-Query-Group-Id",
    "X-Panel-Id",
    "X-Dashboard-Uid",
    "X-Datasource-Uid",
    "X-Grafana-From-Expr",
    "X-Grafana-Org-Id",
    "X-Panel-Plugin-Id",
)
USER_HEADER = "X-Grafana-User"


def forwardable_headers(
    headers: Mapping[str, str],
    *,
    identity: Identity | None,
    json_data: Mapping[str, Any] | None = None,
    session_cookie: str = "grafana_session",
    oauth_authorization: str | None = None,
    oauth_id_token: str | None = None,
) -> dict[str, str]:
    """The request-derived headers a plugin call may carry, as Grafana decides them.

    * the tracing headers in ``TRACING_HEADERS`` when the caller sent them;
    * ``X-Grafana-User``: the caller's login, never a value the caller sent (not anonymous);
    * ``Cookie``: only cookies the datasource lists in ``jsonData.keepCookies``, and never the
      Grafana session cookie (or its ``_expiry`` companion) even if listed;
    * ``Authorization``/``X-ID-Token``: only with ``jsonData.oauthPassThru`` and only from
      ``oauth_authorization``/``oauth_id_token``, the *current* principal's identity-provider
      tokens. The caller's own Grafana credentials are never forwarded: the bridge holds no
      IdP tokens, so today a pass-through datasource gets none.

    Names are canonical HTTP names; ``query_headers`` gives the QueryData/CheckHealth map form.
    """
    result: dict[str, str] = {}
    for name in TRACING_HEADERS:
        value = _first(headers, name.lower())
        if value:
            result[name] = value
    if identity is not None and not identity.is_anonymous and identity.login:
        result[USER_HEADER] = identity.login
    data = json_data or {}
    keep = _names(data.get("keepCookies"))
    kept = [
        (name, value)
        for name, value in _cookies(headers)
        if name in keep and name not in (session_cookie, f"{session_cookie}_expiry")
    ]
    if kept:
        result["Cookie"] = "; ".join(f"{name}={value}" for name, value in _dedupe(kept))
    if data.get("oauthPassThru") is True and oauth_authorization:
        result["Authorization"] = oauth_authorization
        if oauth_id_token:
            result["X-ID-Token"] = oauth_id_token
    return result


def query_headers(forwarded: Mapping[str, str]) -> dict[str, str]:
    """QueryData/CheckHealth ``headers`` map form: ``http_<Name>`` keys, as the SDK reads them."""
    return {f"http_{name}": value for name, value in forwarded.items()}


# --- header helpers --------------------------------------------------------------------------


def _first(headers: Mapping[str, str], lower_name: str) -> str | None:
    for name, value in headers.items():
        if name.lower() == lower_name:
            return value
    return None


def _cookies(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every ``name=value`` pair of every Cookie header, in order."""
    pairs: list[tuple[str, str]] = []
    for header, value in headers.items():
        if header.lower() != "cookie":
            continue
        for part in value.split(";"):
            name, sep, content = part.strip().partition("=")
            if sep and name.strip():
                pairs.append((name.strip(), content.strip()))
    return pairs


def _dedupe(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    # The first occurrence wins, as Go's Request.Cookie returns it.
    seen: set[str] = set()
    kept = []
    for name, value in pairs:
        if name not in seen:
            seen.add(name)
            kept.append((name, value))
    return kept


def _names(value: Any) -> frozenset[str]:
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str) and v)
    return frozenset()
