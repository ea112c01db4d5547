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

__all__ = ["DEFAULT_DENIED_NETWORKS", "DeniedAddress", "DeniedNetworks", "parse_network"]

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
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
        return any(ip in network for network in self._networks)

    def socket_factory(self, addr_info: aiohttp.AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        if family in (socket.AF_INET, socket.AF_INET6) and self.denies(str(sockaddr[0])):
            raise DeniedAddress()
        return socket.socket(family=family, type=kind, proto=proto)
