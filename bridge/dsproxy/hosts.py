"""Destination hosts, compared in one canonical form (the ASCII host connected to, lower-case,
default ports filled)."""

from __future__ import annotations

from yarl import URL

_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_host(host: str) -> str:
    """The ASCII form of a host name that a connection would use, lower-case, without a trailing
    dot; IP literals lower-cased, without brackets.

    Encoded exactly as yarl (so aiohttp) encodes it for the connection, IDNA 2008 with UTS 46
    mapping: ``straße.de`` is ``xn--strae-oqa.de`` here as on the wire, never ``strasse.de``
    (a different domain, which Python's IDNA 2003 codec would give).
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        encoded = URL.build(scheme="http", host=text).raw_host
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"invalid host name {host!r}: {exc}") from None
    if not encoded:
        raise ValueError(f"invalid host name {host!r}")
    return encoded.rstrip(".").lower()


def canonical_host_entry(entry: str) -> str:
    """An ``allowed_hosts`` entry: ``host`` (any port) or ``host:port``; ``[v6]:port`` too."""
    text = entry.strip()
    if not text or "/" in text or "@" in text:
        raise ValueError(f"expected host or host:port, got {entry!r}")
    host, port = text, ""
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0:
            raise ValueError(f"expected host or host:port, got {entry!r}")
        host, rest = text[: closing + 1], text[closing + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected host or host:port, got {entry!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"invalid port in {entry!r}")
    name = canonical_host(host)
    return host_key(name, int(port)) if port else host_key(name)


def destination(url: URL) -> tuple[str, int]:
    """The canonical (host, port) a URL connects to."""
    host = canonical_host(url.raw_host or "")
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
    return host, port


def host_key(host: str, port: int | None = None) -> str:
    """``host`` or ``host:port`` as allow-list entries spell it (IPv6 in brackets)."""
    name = f"[{host}]" if ":" in host else host
    return name if port is None else f"{name}:{port}"


def allowed(url: URL, entries: frozenset[str]) -> bool:
    host, port = destination(url)
    return host_key(host) in entries or host_key(host, port) in entries
