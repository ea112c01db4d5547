"""The request limits (``limits.*``), each over real HTTP against a bridge with real plugins.

URL length (414), header size and count (431), aiohttp's parser backstop beyond them (400,
connection closed), concurrent calls per plugin (429 with ``Retry-After``, no queue, a
metric), and requests with conflicting ``Content-Length``/``Transfer-Encoding`` (400, never
passed to the delegate or a plugin). The limits are set small so the tests stay cheap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from bridge.config import ConfigError, load_config
from bridge.limits import BACKSTOP_FACTOR
from tests.bridge.conftest import (
    GO,
    GO_GROUP,
    PY,
    PY_GROUP,
    VERSION,
    WAIT,
    FrontDoor,
    StandInGrafana,
    assert_status,
    bridge_config,
    dataplane_service,
    datasource,
    eventually,
    front_door,
    sample,
    stand_in_grafana,
    token_for,
    write_datasources,
    write_manifest,
)

pytestmark = [pytest.mark.go, pytest.mark.asyncio(loop_scope="module")]

MAX_URL = 1024
MAX_HEADER = 512
MAX_HEADERS = 24
MAX_CALLS = 2


@dataclass
class Limited:
    door: FrontDoor
    grafana: StandInGrafana

    @property
    def port(self) -> int:
        return int(self.door.url.rsplit(":", 1)[1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limited(
    tmp_path_factory: pytest.TempPathFactory, go_fixture_binary: Path
) -> AsyncIterator[Limited]:
    root = tmp_path_factory.mktemp("limits")
    write_datasources(root / "provisioning", datasource(PY, "py"), datasource(GO, "go"))
    write_manifest(
        root / "dataplane",
        "services.yaml",
        dataplane_service(PY, PY_GROUP),
        dataplane_service(GO, GO_GROUP),
    )
    async with stand_in_grafana() as (grafana, url):
        config = bridge_config(
            root,
            delegate=url,
            overrides={
                "limits.max_url_bytes": MAX_URL,
                "limits.max_header_bytes": MAX_HEADER,
                "limits.max_headers": MAX_HEADERS,
                "limits.max_calls_per_plugin": MAX_CALLS,
            },
        )
        async with front_door(config) as door:
            yield Limited(door, grafana)


def resource(plugin_group: str, uid: str, rest: str) -> str:
    return f"/apis/{plugin_group}/{VERSION}/namespaces/default/datasources/{uid}/resource/{rest}"


# -- URL length --------------------------------------------------------------------------------


async def test_url_at_the_limit_is_served(limited: Limited) -> None:
    path = resource(PY_GROUP, "py", "echo?pad=")
    path += "x" * (MAX_URL - len(path))
    answer = await limited.door.call("GET", path)
    assert answer.status == 200, answer.text


@pytest.mark.parametrize("where", ["plugin", "delegate"])
async def test_url_over_the_limit_is_414_status(limited: Limited, where: str) -> None:
    path = resource(PY_GROUP, "py", "echo?pad=") if where == "plugin" else "/api/search?pad="
    path += "x" * (MAX_URL + 1 - len(path))
    before = len(limited.grafana.seen)
    calls = await limited.door.plugin_calls(PY, "callResource")
    answer = await limited.door.call("GET", path)
    assert_status(answer, 414, "RequestURITooLong", "limits.max_url_bytes")
    assert f"is {MAX_URL + 1} bytes" in answer.json()["message"]
    assert len(limited.grafana.seen) == before
    assert await limited.door.plugin_calls(PY, "callResource") == calls


# -- headers -----------------------------------------------------------------------------------


async def test_header_over_the_limit_is_431_status(limited: Limited) -> None:
    answer = await limited.door.call(
        "GET", resource(PY_GROUP, "py", "echo"), headers={"X-Big": "v" * MAX_HEADER}
    )
    assert_status(answer, 431, "RequestHeaderFieldsTooLarge", "limits.max_header_bytes")
    assert "'X-Big'" in answer.json()["message"]


async def test_too_many_headers_is_431_status(limited: Limited) -> None:
    before = len(limited.grafana.seen)
    many = {f"X-Extra-{i}": "1" for i in range(MAX_HEADERS)}
    answer = await limited.door.call("GET", "/api/dashboards", headers=many)
    assert_status(answer, 431, "RequestHeaderFieldsTooLarge", "limits.max_headers")
    assert len(limited.grafana.seen) == before


async def test_headers_within_the_limits_are_served(limited: Limited) -> None:
    some = {f"X-Extra-{i}": "v" * (MAX_HEADER - 40) for i in range(MAX_HEADERS - 8)}
    answer = await limited.door.call("GET", resource(PY_GROUP, "py", "echo"), headers=some)
    assert answer.status == 200, answer.text


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes, bool]:
    """Send ``request`` bytes as they are; the status, the whole answer, and whether the
    bridge closed the connection (EOF within the deadline)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            data = await reader.read()  # until the bridge closes the connection
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else 0
        return status, data, reader.at_eof()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "kind", ["request line", "header line", "header count"], ids=lambda k: k.replace(" ", "-")
)
async def test_beyond_the_parser_backstop_the_connection_is_closed(
    limited: Limited, kind: str
) -> None:
    """Far over a limit aiohttp's parser stops reading: 400, connection closed, bridge fine."""
    auth = f"Authorization: Bearer {token_for('admin')}\r\n".encode()
    line = b"GET /api/search HTTP/1.1\r\n"
    headers = b"Host: bridge\r\n" + auth
    huge = BACKSTOP_FACTOR * MAX_URL + 200
    if kind == "request line":
        line = b"GET /api/search?q=" + b"x" * huge + b" HTTP/1.1\r\n"
    elif kind == "header line":
        headers += b"X-Huge: " + b"v" * (BACKSTOP_FACTOR * MAX_HEADER + 10) + b"\r\n"
    else:
        headers += b"".join(b"X-N%d: 1\r\n" % i for i in range(BACKSTOP_FACTOR * MAX_HEADERS + 5))
    before = len(limited.grafana.seen)
    status, data, closed = await raw_exchange(limited.port, line + headers + b"\r\n")
    assert status == 400, data[:200]
    assert closed
    assert len(limited.grafana.seen) == before
    # The bridge goes on serving.
    answer = await limited.door.call("GET", resource(PY_GROUP, "py", "echo"))
    assert answer.status == 200


# -- concurrent calls per plugin ---------------------------------------------------------------


async def test_calls_beyond_the_plugin_limit_are_429_with_retry_after(limited: Limited) -> None:
    door = limited.door
    concurrency = door.bridge.deps.concurrency
    slow = resource(PY_GROUP, "py", "sleep?ms=1500")
    before = await door.plugin_calls(PY, "callResource")
    held = [asyncio.create_task(door.call("GET", slow)) for _ in range(MAX_CALLS)]
    try:

        async def both_in_flight() -> bool:
            return concurrency.in_flight(PY) == MAX_CALLS

        await eventually(both_in_flight, what=f"{MAX_CALLS} calls in flight to {PY}")
        metrics = await door.metrics()
        assert sample(metrics, "grafana_bridge_plugin_calls_in_flight", plugin_id=PY) == MAX_CALLS
        refused = await door.call("GET", resource(PY_GROUP, "py", "echo"))
        assert_status(refused, 429, "TooManyRequests", f"limit of {MAX_CALLS} concurrent calls")
        assert refused.headers["Retry-After"] == "1"
        # Another plugin has slots of its own; the delegate is not limited.
        other = await door.call("GET", resource(GO_GROUP, "go", "echo"))
        assert other.status != 429, other.text
        delegated = await door.call("GET", "/api/health")
        assert delegated.status == 200
    finally:
        answers = await asyncio.gather(*held)
    assert [a.status for a in answers] == [200] * MAX_CALLS
    assert concurrency.in_flight(PY) == 0
    metrics = await door.metrics()
    assert (sample(metrics, "grafana_bridge_plugin_calls_rejected_total", plugin_id=PY) or 0) >= 1
    assert sample(metrics, "grafana_bridge_plugin_calls_in_flight", plugin_id=PY) == 0
    # The refused call never reached the plugin: only the held ones were counted there.
    assert await door.plugin_calls(PY, "callResource") == before + MAX_CALLS
    again = await door.call("GET", resource(PY_GROUP, "py", "echo"))
    assert again.status == 200


async def test_refused_and_failed_calls_give_their_slot_back(limited: Limited) -> None:
    door = limited.door
    for _ in range(MAX_CALLS + 2):
        answer = await door.call("GET", resource(PY_GROUP, "py", "status/500"))
        assert answer.status == 500
    assert door.bridge.deps.concurrency.in_flight(PY) == 0
    answer = await door.call("GET", resource(PY_GROUP, "py", "echo"))
    assert answer.status == 200


# -- conflicting framing -----------------------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: bridge\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: +5\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding : chunked\r\n",
    ],
    ids=["cl-then-te", "te-then-cl", "two-lengths", "signed-length", "te-twice", "te-space"],
)
@pytest.mark.parametrize("where", ["plugin", "delegate"])
async def test_conflicting_framing_is_400_and_never_passed_on(
    limited: Limited, framing: bytes, where: str
) -> None:
    target = resource(PY_GROUP, "py", "echo") if where == "plugin" else "/api/ds/query"
    head = f"POST {target} HTTP/1.1\r\nHost: bridge\r\n".encode()
    head += f"Authorization: Bearer {token_for('admin')}\r\n".encode()
    body = b"0\r\n\r\n" + SMUGGLED  # what a smuggler hides behind the ambiguous length
    seen = len(limited.grafana.seen)
    calls = await limited.door.plugin_calls(PY, "callResource")
    status, data, closed = await raw_exchange(limited.port, head + framing + b"\r\n" + body)
    assert status == 400, data[:300]
    assert closed  # nothing after the bad request is read as a next request
    assert b"/smuggled" not in data
    assert len(limited.grafana.seen) == seen
    assert await limited.door.plugin_calls(PY, "callResource") == calls


# -- review: counting as sent, and slots on cancellation ---------------------------------------


async def test_repeated_header_fields_each_count(limited: Limited) -> None:
    """One name sent many times is many fields (as Go and the RFC count them), not one."""
    head = f"GET {resource(PY_GROUP, 'py', 'echo')} HTTP/1.1\r\nHost: bridge\r\n".encode()
    head += f"Authorization: Bearer {token_for('admin')}\r\nConnection: close\r\n".encode()
    status, data, _ = await raw_exchange(
        limited.port, head + b"X-Dup: 1\r\n" * MAX_HEADERS + b"\r\n"
    )
    assert status == 431, data[:300]
    assert b"limits.max_headers" in data


async def test_the_url_is_measured_in_bytes_as_sent(limited: Limited) -> None:
    """Not decoded: %41 is three bytes (raw non-ASCII bytes are a 400 from aiohttp's parser)."""
    head = resource(PY_GROUP, "py", "echo?pad=").encode()
    unit = b"%41"
    pad = unit * ((MAX_URL - len(head)) // len(unit) + 1)  # just over in bytes, under decoded
    request = b"GET " + head + pad + b" HTTP/1.1\r\nHost: bridge\r\n"
    request += f"Authorization: Bearer {token_for('admin')}\r\nConnection: close\r\n\r\n".encode()
    status, data, _ = await raw_exchange(limited.port, request)
    assert status == 414, data[:300]
    assert f"is {len(head) + len(pad)} bytes".encode() in data


async def test_a_client_that_goes_away_gives_its_slot_back(limited: Limited) -> None:
    door = limited.door
    concurrency = door.bridge.deps.concurrency
    head = f"GET {resource(PY_GROUP, 'py', 'sleep?ms=3000')} HTTP/1.1\r\nHost: bridge\r\n"
    head += f"Authorization: Bearer {token_for('admin')}\r\n\r\n"
    connections = [await asyncio.open_connection("127.0.0.1", limited.port) for _ in range(2)]
    for _, writer in connections:
        writer.write(head.encode())
        await writer.drain()

    async def all_held() -> bool:
        return concurrency.in_flight(PY) == MAX_CALLS

    await eventually(all_held, what="both slots held")
    for _, writer in connections:
        writer.close()
        await writer.wait_closed()

    async def all_free() -> bool:
        return concurrency.in_flight(PY) == 0

    await eventually(all_free, what="both slots given back")
    answers = await asyncio.gather(
        *(door.call("GET", resource(PY_GROUP, "py", "echo")) for _ in range(MAX_CALLS))
    )
    assert [a.status for a in answers] == [200] * MAX_CALLS


@pytest.mark.parametrize("calls", [0, -1])
async def test_a_per_plugin_limit_below_one_is_a_configuration_error(calls: int) -> None:
    """A plugin limit of 0 would answer 429 to every call forever; refused at start-up."""
    with pytest.raises(ConfigError, match=r"calls_per_plugin.*expected at least 1"):
        load_config(environ={}, overrides={"limits.calls_per_plugin": {PY: calls}})
    config = load_config(environ={}, overrides={"limits.calls_per_plugin": {PY: 1}})
    assert config.limits.calls_per_plugin == {PY: 1}
