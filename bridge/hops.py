"""Hop-by-hop headers: the one rule every hop in the bridge applies to what it passes on.

The bridge is an intermediary three times over: to Grafana (the delegate), to a plugin
(``CallResource``), and to a datasource (the datasource proxy). Each time, headers that describe
one connection rather than the message (RFC 9110 §7.6.1) stop here:

- the fixed set below, which is also what Go's ``httputil.ReverseProxy`` drops;
- any ``Proxy-*`` header (credentials and connection options for a proxy, never for the origin);
- every header a ``Connection`` header names, whatever it is called.

Each hop adds its own list on top (cookies, identity headers, lengths it recomputes).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final

__all__ = ["HOP_BY_HOP", "connection_tokens", "end_to_end", "go_header_name"]

HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
_PROXY_PREFIX: Final = "proxy-"
# The bytes Go's net/textproto accepts in a header name it canonicalises (RFC 9110 tchar).
_TOKEN: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def connection_tokens(items: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The lower-cased options every ``Connection`` header in ``items`` lists."""
    return frozenset(
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    )


def end_to_end(
    items: Iterable[tuple[str, str]],
    *,
    drop: Collection[str] = (),
    drop_prefixes: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """``items`` in order, without hop-by-hop headers and without the lower-case names in
    ``drop`` or starting with one of ``drop_prefixes``."""
    pairs = list(items)
    named = connection_tokens(pairs)
    prefixes = (_PROXY_PREFIX, *drop_prefixes)
    return [
        (name, value)
        for name, value in pairs
        if (key := name.lower()) not in HOP_BY_HOP
        and key not in named
        and key not in drop
        and not key.startswith(prefixes)
    ]


def go_header_name(name: str) -> str:
    """``name`` as Go's ``textproto.CanonicalMIMEHeaderKey`` spells it (``x-foo-bar`` →
    ``X-Foo-Bar``); a name with a byte outside the token set is returned unchanged, as Go does.

    Grafana reads requests with net/http, so a plugin always sees header names in this form
    and looks them up with ``http.Header.Get``, which canonicalises its argument: a header
    passed in any other spelling would be invisible to it.
    """
    raw = name.encode("latin-1", "replace")
    if not raw or any(byte not in _TOKEN for byte in raw):
        return name
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))
