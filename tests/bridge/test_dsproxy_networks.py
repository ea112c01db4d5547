"""datasource_proxy.denied_networks: checked on the address dialled, after DNS, literals too.

Against a real bridge front door, real plugin processes and a real HTTP datasource on loopback.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from bridge.config import BridgeConfig
from bridge.dsproxy.networks import DEFAULT_DENIED_NETWORKS, DeniedNetworks
from bridge.dsproxy.settings import DatasourceProxySettings
from tests.bridge.conftest import assert_status, front_door, serving
from tests.bridge.dsproxy_scene import PROXY, ProxyScene, StandInDatasource, proxy_config

DENIED_MESSAGE = "datasource_proxy.denied_networks"


def test_default_networks_cover_metadata_services_and_link_local() -> None:
    check = DeniedNetworks(DatasourceProxySettings().denied_networks)
    for address in ("169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%1", "fd00:ec2::254"):
        assert check.denies(address), address
    assert check.denies("100.100.100.200")
    # IPv6 spellings that lead to the same IPv4 address: mapped, NAT64, 6to4, compatible.
    for address in ("::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1"):
        assert check.denies(address), address
    assert check.denies("::169.254.169.254")
    assert not check.denies("64:ff9b::a00:1")  # NAT64 of 10.0.0.1: not in the list
    assert not check.denies("::")
    for address in ("127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "2001:db8::1"):
        assert not check.denies(address), address
    assert DatasourceProxySettings().denied_networks == DEFAULT_DENIED_NETWORKS


def test_networks_are_normalised_and_bad_ones_refused() -> None:
    settings = DatasourceProxySettings(denied_networks=(" 10.1.2.3/8", "::1"))
    assert settings.denied_networks == ("10.0.0.0/8", "::1/128")
    with pytest.raises(pydantic.ValidationError, match="denied_networks"):
        DatasourceProxySettings(denied_networks=("10.0.0.0/33",))
    with pytest.raises(pydantic.ValidationError, match="denied_networks"):
        DatasourceProxySettings(denied_networks=("metadata.internal",))


def _scene_config(
    root: Path, ds_url: str, extra: list[dict[str, Any]], **proxy: Any
) -> BridgeConfig:
    config = proxy_config(root, ds_url, ds_url, "", ds_url)
    provisioning = root / "provisioning" / "datasources" / "proxy.yaml"
    document = yaml.safe_load(provisioning.read_text())
    document["datasources"] += extra
    provisioning.write_text(yaml.safe_dump(document))
    settings = DatasourceProxySettings(**{**config.datasource_proxy.model_dump(), **proxy})
    return config.model_copy(update={"datasource_proxy": settings})


async def _scene(
    root: Path, extra: list[dict[str, Any]], **proxy: Any
) -> AsyncIterator[ProxyScene]:
    datasource, other = StandInDatasource(), StandInDatasource()
    async with serving(datasource.app()) as ds_url:
        config = _scene_config(root, ds_url, extra, **proxy)
        async with front_door(config) as door:
            yield ProxyScene(door, datasource, other)


def _datasource(uid: str, url: str) -> dict[str, Any]:
    return {"name": uid, "uid": uid, "type": PROXY, "url": url, "jsonData": {"url": url}}


async def test_metadata_addresses_are_refused_by_default(tmp_path: Path) -> None:
    extra = [
        _datasource("metadata", "http://169.254.169.254/latest/meta-data"),
        _datasource("mapped", "http://[::ffff:169.254.169.254]/latest/meta-data"),
    ]
    allowed = ["127.0.0.1", "169.254.169.254", "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]"]
    async for scene in _scene(tmp_path, extra, allowed_hosts=allowed):
        for uid in ("metadata", "mapped"):
            started = time.monotonic()
            answer = await scene.proxy(uid, "iam/security-credentials")
            # Refused before a packet leaves: no connect timeout to wait for.
            assert time.monotonic() - started < 2.0
            assert_status(answer, 403, "Forbidden", DENIED_MESSAGE)
        # Loopback is not in the default list: an ordinary datasource still works.
        answer = await scene.proxy("px", "q/x", user="viewer")
        assert answer.status == 200, answer.text


async def test_a_name_that_resolves_into_a_denied_network_is_refused(tmp_path: Path) -> None:
    async for scene in _scene(
        tmp_path,
        [],
        allowed_hosts=["127.0.0.1", "localhost"],
        denied_networks=["127.0.0.0/8", "::1/128"],
    ):
        # "elsewhere" names localhost: the allow-list passes it, the addresses it resolves to
        # do not; the literal 127.0.0.1 of "px" is refused the same way.
        for uid in ("elsewhere", "px"):
            answer = await scene.proxy(uid, "q/x", user="viewer")
            assert_status(answer, 403, "Forbidden", DENIED_MESSAGE)
        # A route's tokenAuth.url is held to the same rule, and says so.
        answer = await scene.proxy("px", "oauth/x")
        assert_status(answer, 403, "Forbidden", "could not get an access token")
        assert "the token endpoint 127.0.0.1 leads only to addresses" in answer.json()["message"]
        assert scene.datasource.seen == []
