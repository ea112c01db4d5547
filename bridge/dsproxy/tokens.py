"""OAuth2 access tokens for routes with ``tokenAuth``: fetched, cached until expiry, refreshed.

Grafana's generic token provider: POST the rendered ``params`` form-encoded to the rendered
``url``; the answer's ``access_token`` is used until ``expires_on`` (epoch seconds) or
``expires_in`` (seconds from now), and fetched again once fewer than 10 s remain. The cache key
holds the datasource (org, uid, last update) and the route (index, path, method), so two
datasources or two routes never share a token, and editing a datasource drops its tokens. It
never holds a credential of the caller. Concurrent requests needing the same token wait for a
single fetch and share its outcome, a failure included (a failure is not cached: the next
request tries again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from yarl import URL

from bridge.dsproxy.networks import connection_denied

__all__ = ["TokenCache", "TokenError", "TokenKey"]

log = logging.getLogger(__name__)

REFRESH_MARGIN: Final = 10.0  # seconds; Grafana reuses a token while it has more than this left
_MAX_TOKEN_ANSWER: Final = 1 << 20


class TokenError(Exception):
    """The token endpoint could not be reached or gave no usable token."""


class TokenEndpointDenied(TokenError):
    """The token endpoint leads only to addresses in ``datasource_proxy.denied_networks``."""


@dataclass(frozen=True, slots=True)
class TokenKey:
    org_id: int
    uid: str
    datasource_updated_ms: int
    route_index: int
    route_path: str
    route_method: str


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: float  # on the clock the cache was given


class TokenCache:
    """Tokens per (datasource, route); one fetch at a time per key."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: dict[TokenKey, _Token] = {}
        self._locks: dict[TokenKey, asyncio.Lock] = {}
        # Per key: fetches finished, and the last one's failure (None once one succeeds).
        self._attempts: dict[TokenKey, int] = {}
        self._failures: dict[TokenKey, TokenError] = {}
        self.fetches = 0  # token requests made, for metrics and tests

    def __len__(self) -> int:
        return len(self._tokens)

    def clear(self) -> None:
        self._tokens.clear()

    async def get(
        self,
        key: TokenKey,
        *,
        session: aiohttp.ClientSession,
        url: URL,
        params: Mapping[str, str],
        timeout: float,
    ) -> str:
        cached = self._fresh(key)
        if cached is not None:
            return cached
        attempt = self._attempts.get(key, 0)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._fresh(key)  # another request may have fetched it meanwhile
            if cached is not None:
                return cached
            failure = self._failures.get(key)
            if failure is not None and self._attempts.get(key, 0) != attempt:
                # A fetch that finished while this request waited failed: share its answer
                # rather than queue fetch after fetch, each up to ``timeout``.
                raise TokenError(str(failure))
            try:
                token = await self._fetch(session, url, params, timeout)
            except TokenError as exc:
                self._attempts[key] = self._attempts.get(key, 0) + 1
                self._failures[key] = exc
                raise
            self._attempts[key] = self._attempts.get(key, 0) + 1
            self._failures.pop(key, None)
            self._forget_stale(key)
            self._tokens[key] = token
            return token.value

    def _fresh(self, key: TokenKey) -> str | None:
        token = self._tokens.get(key)
        if token is not None and token.expires_at > self._clock() + REFRESH_MARGIN:
            return token.value
        return None

    def _forget_stale(self, key: TokenKey) -> None:
        # Tokens of an older version of the same datasource can never be used again.
        for other in [
            k
            for k in self._tokens
            if (k.org_id, k.uid) == (key.org_id, key.uid)
            and k.datasource_updated_ms != key.datasource_updated_ms
        ]:
            del self._tokens[other]
            self._locks.pop(other, None)
            self._attempts.pop(other, None)
            self._failures.pop(other, None)

    async def _fetch(
        self, session: aiohttp.ClientSession, url: URL, params: Mapping[str, str], timeout: float
    ) -> _Token:
        self.fetches += 1
        try:
            async with session.post(
                url,
                data=dict(params),  # form-encoded, as Grafana sends it
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as answer:
                body = await answer.content.read(_MAX_TOKEN_ANSWER + 1)
                status = answer.status
        except TimeoutError:
            raise TokenError(f"the token endpoint did not answer within {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            if connection_denied(exc):
                raise TokenEndpointDenied(
                    f"the token endpoint {url.host} leads only to addresses the datasource "
                    "proxy may not connect to (datasource_proxy.denied_networks)"
                ) from None
            raise TokenError(
                f"the token endpoint could not be reached ({type(exc).__name__})"
            ) from None
        if not 200 <= status < 300:
            raise TokenError(f"the token endpoint answered {status}")
        if len(body) > _MAX_TOKEN_ANSWER:
            raise TokenError("the token endpoint's answer is larger than 1 MiB")
        try:
            document: Any = json.loads(body)
        except ValueError:
            raise TokenError("the token endpoint's answer is not JSON") from None
        return self._parse(document)

    def _parse(self, document: Any) -> _Token:
        if not isinstance(document, Mapping):
            raise TokenError("the token endpoint's answer is not a JSON object")
        value = document.get("access_token")
        if not isinstance(value, str) or not value:
            raise TokenError("the token endpoint's answer has no access_token")
        now = self._clock()
        expires_in = _number(document.get("expires_in"))
        expires_on = _number(document.get("expires_on"))
        if expires_in is not None:
            expires_at = now + expires_in
        elif expires_on is not None:
            expires_at = expires_on
        else:
            # No expiry given: Grafana's zero time means "expired", i.e. fetched every time.
            expires_at = 0.0
        return _Token(value=value, expires_at=expires_at)


def _number(value: Any) -> float | None:
    # Azure AD sends both as strings ("3599"); others as JSON numbers.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None
