"""The ``datasource_proxy:`` configuration section (Grafana's ``[dataproxy]`` equivalents)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge.dsproxy.hosts import canonical_host_entry
from bridge.dsproxy.networks import DEFAULT_DENIED_NETWORKS, parse_network


class DatasourceProxySettings(BaseModel):
    """Timeouts, destinations and limits of the ``datasource-proxy`` service type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # How long the datasource may take to send its response headers, and at most between two
    # chunks of its body (Grafana's [dataproxy] timeout, 30 s).
    timeout: float = Field(default=30.0, gt=0)
    # Connecting, TLS handshake included (Grafana's [dataproxy] dialTimeout, 10 s).
    dial_timeout: float = Field(default=10.0, gt=0)
    # The whole OAuth2 token request of a route's tokenAuth.
    token_timeout: float = Field(default=10.0, gt=0)
    # host or host:port entries. Empty: each request may go only to its datasource URL's host
    # and the hosts its routes' url/tokenAuth.url render to (see docs/datasource-proxy.md).
    allowed_hosts: tuple[str, ...] = ()
    # Addresses or CIDR networks never connected to, checked on every address dialled after
    # DNS resolution (IP literals too). Default: link-local and cloud metadata addresses.
    denied_networks: tuple[str, ...] = DEFAULT_DENIED_NETWORKS
    # Send the caller's login as X-Grafana-User (Grafana's [dataproxy] send_user_header).
    send_user_header: bool = False
    # Refuse answers bigger than this many bytes (0: no limit; Grafana's response_limit).
    response_limit_bytes: int = Field(default=0, ge=0)
    max_connections: int = Field(default=100, ge=1)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(canonical_host_entry(entry) for entry in value)

    @field_validator("denied_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(parse_network(entry) for entry in value)
