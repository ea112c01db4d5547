"""Networks the datasource proxy never connects to, checked on the address actually dialled.

The host allow-list is about names; this is about where a name leads. A datasource URL, a
route's ``url`` or a ``tokenAuth.url`` whose host resolves (or rebinds, between one request and
the next) to a cloud metadata service would hand the instance's credentials to whoever may
edit a datasource. So every address aiohttp is about to connect to, after DNS resolution and
for IP literals alike, is checked here, in the socket factory: there is no later point at which
the destination could still change (peers-and-pitfalls §4.4, CVE-2023-4399's advice).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from typing import Final

import aiohttp

__all__ = [
    "DEFAULT_DENIED_NETWORKS",
    "DeniedAddress",
    "DeniedNetworks",
    "connection_denied",
    "parse_network",
]

# Link-local (every major cloud's instance metadata service is 169.254.169.254, and IPv6
# link-local has no business being a datasource), AWS's IPv6 metadata address, and Alibaba
# Cloud's metadata address, which is outside the link-local range.
DEFAULT_DENIED_NETWORKS: Final = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(entry: str) -> str:
    """``entry`` (an address or CIDR network) in normal form; ValueError when it is neither."""
    return str(ipaddress.ip_network(entry.strip(), strict=False))


_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible addresses


def _embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: IPv4-mapped, 6to4, NAT64 (a DNS64 network
    dials an A record of 169.254.169.254 as 64:ff9b::a9fe:a9fe) and IPv4-compatible."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4 is not None]
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


class DeniedAddress(OSError):
    """The address to connect to is in a denied network.

    The message is the same for every address on purpose: aiohttp (through aiohappyeyeballs)
    re-raises one of the per-address errors only when they all read alike, so a name whose
    every address is denied surfaces as this exception and not as a generic OSError.
    """

    def __init__(self) -> None:
        super().__init__(
            errno.EACCES,
            "the address is in a network the datasource proxy may not connect to "
            "(datasource_proxy.denied_networks)",
        )


def connection_denied(exc: BaseException) -> bool:
    """Whether aiohttp could not connect because every address was a denied one."""
    return isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, DeniedAddress)


class DeniedNetworks:
    """The check, and the aiohttp socket factory that applies it to every connection."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(entry) for entry in networks
        )

    def denies(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(
            candidate in network
            for candidate in (ip, *_embedded_ipv4(ip))
            for network in self._networks
        )

    def socket_factory(self, addr_info: aiohttp.AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        if family in (socket.AF_INET, socket.AF_INET6) and self.denies(str(sockaddr[0])):
            raise DeniedAddress()
        return socket.socket(family=family, type=kind, proto=proto)
