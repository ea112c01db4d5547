"""The front door's ``query`` endpoint over HTTP, against the Python and the Go fixture plugins.

One row per behaviour: the request, the status code, and a check of the body. A third plugin
id, ``bridge-pyarrow-datasource``, is the Python fixture reached through a gRPC relay that
asks it for Arrow frames (the bridge itself always asks for JSON, and both fixtures honour
that), so the bridge's Arrow-to-JSON conversion is exercised end to end as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from plugin_host.handshake import parse_handshake
from protos.pluginv2 import backend_pb2 as pb
from tests.bridge.conftest import (
    GO,
    GO_GROUP,
    PY,
    PY_GROUP,
    VERSION,
    WAIT,
    Answer,
    FrontDoor,
    assert_status,
    bridge_config,
    dataplane_service,
    datasource,
    front_door,
    write_datasources,
    write_manifest,
)
from tests.helpers import PY_FIXTURE, plugin_env

pytestmark = [pytest.mark.go, pytest.mark.asyncio(loop_scope="module")]

ARROW = "bridge-pyarrow-datasource"
ARROW_GROUP = "pyarrow.datasource.grafana.app"
FROM_MS = 1_700_000_000_000
TO_MS = 1_700_000_060_000
MAX_BODY = 64 * 1024
QUERY_DATA = "/pluginv2.Data/QueryData"


# -- the Python fixture, asked for Arrow -----------------------------------------------------


class AskForArrow(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Relays every call to the fixture unchanged, except that QueryData asks for Arrow."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        if method == QUERY_DATA:
            return grpc.unary_unary_rpc_method_handler(self._query_data)

        # Any other call, whatever its shape: on the wire every gRPC call is a stream.
        async def relay(requests: AsyncIterable[bytes], context: Any) -> AsyncIterator[bytes]:
            call = self._channel.stream_stream(method, None, None)(
                requests.__aiter__(), timeout=context.time_remaining()
            )
            try:
                async for reply in call:
                    yield reply
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return grpc.stream_stream_rpc_method_handler(relay)

    async def _query_data(self, raw: bytes, context: Any) -> bytes:
        request = pb.QueryDataRequest.FromString(raw)
        request.format = pb.ARROW
        try:
            reply: bytes = await self._channel.unary_unary(QUERY_DATA, None, None)(
                request.SerializeToString(), timeout=context.time_remaining()
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return reply


@asynccontextmanager
async def python_fixture_answering_arrow() -> AsyncIterator[str]:
    """The Python fixture run by the test, behind :class:`AskForArrow`; yields its address."""
    sockets = Path(tempfile.mkdtemp(prefix="gfb-arrow-", dir="/tmp"))  # short: a unix socket
    env = plugin_env()
    env["TMPDIR"] = env["PLUGIN_UNIX_SOCKET_DIR"] = str(sockets)
    process = await asyncio.create_subprocess_exec(
        str(PY_FIXTURE),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), WAIT)
        handshake = parse_handshake(line.decode(), plugin_id=ARROW)
        channel = grpc.aio.insecure_channel(handshake.grpc_target)
        relay = grpc.aio.server()
        relay.add_generic_rpc_handlers((AskForArrow(channel),))
        address = f"unix:{sockets / 'relay.sock'}"
        relay.add_insecure_port(address)
        await relay.start()
        try:
            yield address
        finally:
            await relay.stop(None)
            await channel.close(None)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        shutil.rmtree(sockets, ignore_errors=True)


# -- the bridge ------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(
    tmp_path_factory: pytest.TempPathFactory, go_fixture_binary: Path
) -> AsyncIterator[FrontDoor]:
    root = tmp_path_factory.mktemp("front-door-query")
    write_datasources(
        root / "provisioning",
        datasource(PY, "py"),
        datasource(GO, "go"),
        datasource(ARROW, "arrow"),
    )
    write_manifest(
        root / "dataplane",
        "services.yaml",
        dataplane_service(PY, PY_GROUP),
        dataplane_service(GO, GO_GROUP),
        dataplane_service(ARROW, ARROW_GROUP, services=({"type": "query"},)),
    )
    async with python_fixture_answering_arrow() as arrow:
        config = bridge_config(
            root,
            overrides={"plugins.attach": {ARROW: arrow}, "limits.max_body_bytes": MAX_BODY},
        )
        async with front_door(config) as running:
            yield running


def query_path(group: str, uid: str, *, collection: str = "datasources") -> str:
    return f"/apis/{group}/{VERSION}/namespaces/default/{collection}/{uid}/query"


def request_body(ref: dict[str, str] | None, *queries: dict[str, Any]) -> dict[str, Any]:
    """An /api/ds/query body; the first query carries the datasource reference ``ref``."""
    built = [dict(q) for q in queries]
    if ref is not None:
        built[0]["datasource"] = ref
    return {"from": str(FROM_MS), "to": str(TO_MS), "queries": built}


def ref(plugin_id: str, uid: str) -> dict[str, str]:
    return {"type": plugin_id, "uid": uid}


def raw_body(*, time_from: str = '"now-1h"', query: str = '"points": 1') -> bytes:
    """A body spelled out, for values ``json.dumps`` would not write: ``from`` and one more
    key of the query, each as JSON text."""
    return (
        f'{{"from": {time_from}, "to": "now", "queries": [{{"refId": "A", '
        f'"datasource": {{"type": "{PY}", "uid": "py"}}, {query}}}]}}'
    ).encode()


# -- checks ----------------------------------------------------------------------------------

Check = Callable[[Answer], None]


def python_frames(*points: tuple[str, int]) -> Check:
    """Results for the given (refId, points), in refId order, as the Python fixture builds them."""

    def check(answer: Answer) -> None:
        results = answer.json()["results"]
        assert list(results) == sorted(ref_id for ref_id, _ in points)
        for ref_id, count in points:
            result = results[ref_id]
            assert result["status"] == 200
            (frame,) = result["frames"]
            assert frame["schema"]["refId"] == ref_id
            assert frame["schema"]["name"] == f"series-{ref_id}"
            assert [f["name"] for f in frame["schema"]["fields"]] == ["time", "value"]
            times, values = frame["data"]["values"]
            assert times == [FROM_MS + i * 1000 for i in range(count)]
            assert values == list(range(count))

    return check


def go_frames(*points: tuple[str, int]) -> Check:
    """Results for (refId, maxDataPoints): the Go fixture spreads points over the range."""

    def check(answer: Answer) -> None:
        results = answer.json()["results"]
        assert list(results) == sorted(ref_id for ref_id, _ in points)
        for ref_id, count in points:
            result = results[ref_id]
            assert result["status"] == 200
            (frame,) = result["frames"]
            assert frame["schema"] == {
                "name": "gofixture",
                "refId": ref_id,
                "fields": [
                    {"name": "time", "type": "time", "typeInfo": {"frame": "time.Time"}},
                    {"name": "value", "type": "number", "typeInfo": {"frame": "float64"}},
                ],
            }
            times, values = frame["data"]["values"]
            assert times[0] == FROM_MS and times[-1] == TO_MS and len(times) == count
            assert len(values) == count

    return check


def failed_result(ref_id: str, *, error: str, status: int, source: str) -> Check:
    """``ref_id`` failed as the plugin said; every other result succeeded."""

    def check(answer: Answer) -> None:
        results = answer.json()["results"]
        assert list(results) == sorted(results)
        assert results[ref_id] == {
            "error": error,
            "errorSource": source,
            "status": status,
            "frames": [],
        }
        others = [r for key, r in results.items() if key != ref_id]
        assert others and all(r["status"] == 200 and len(r["frames"]) == 1 for r in others)

    return check


def status(code: int, reason: str, message: str) -> Check:
    return lambda answer: assert_status(answer, code, reason, message)


def status_with_allow(code: int, reason: str, message: str, allow: str) -> Check:
    def check(answer: Answer) -> None:
        assert_status(answer, code, reason, message)
        assert answer.headers["Allow"] == allow

    return check


# -- rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    path: str
    body: dict[str, Any] | bytes | None
    status: int
    check: Check
    method: str = "POST"


PY_PATH = query_path(PY_GROUP, "py")
GO_PATH = query_path(GO_GROUP, "go")

ROWS = [
    Row(
        "python datasources: frames, refIds sorted",
        PY_PATH,
        request_body(ref(PY, "py"), {"refId": "B", "points": 3}, {"refId": "A", "points": 2}),
        200,
        python_frames(("A", 2), ("B", 3)),
    ),
    Row(
        "python connections (the older path)",
        query_path(PY_GROUP, "py", collection="connections"),
        request_body(ref(PY, "py"), {"refId": "Z", "points": 1}, {"refId": "Y", "points": 4}),
        200,
        python_frames(("Y", 4), ("Z", 1)),
    ),
    Row(
        "go datasources: frames, refIds sorted",
        GO_PATH,
        request_body(
            ref(GO, "go"), {"refId": "B", "maxDataPoints": 3}, {"refId": "A", "maxDataPoints": 5}
        ),
        200,
        go_frames(("A", 5), ("B", 3)),
    ),
    Row(
        "go connections (the older path)",
        query_path(GO_GROUP, "go", collection="connections"),
        request_body(ref(GO, "go"), {"refId": "Q", "maxDataPoints": 2}),
        200,
        go_frames(("Q", 2)),
    ),
    Row(
        "python per-query error: 207 with its error, status and source",
        PY_PATH,
        request_body(
            ref(PY, "py"),
            {"refId": "B", "points": 1},
            {"refId": "A", "error": "no such metric", "errorSource": "downstream"},
        ),
        207,
        failed_result("A", error="no such metric", status=400, source="downstream"),
    ),
    Row(
        "go per-query error: 207 with its error, status and source",
        GO_PATH,
        request_body(ref(GO, "go"), {"refId": "A", "error": "bad"}, {"refId": "B"}),
        207,
        failed_result("A", error="bad", status=500, source="plugin"),
    ),
    Row(
        "request error: 502 with the plugin's message",
        PY_PATH,
        request_body(ref(PY, "py"), {"refId": "A", "requestError": "the upstream is on fire"}),
        502,
        status(502, "BadGateway", f"plugin {PY}: the upstream is on fire"),
    ),
    Row(
        "body that is not JSON",
        PY_PATH,
        b'{"queries": [',
        400,
        status(400, "BadRequest", "request body is not valid JSON"),
    ),
    Row(
        "NaN, which Python's JSON reads and Go's does not",
        PY_PATH,
        raw_body(time_from="NaN"),
        400,
        status(400, "BadRequest", "request body is not valid JSON: NaN is not a JSON value"),
    ),
    Row(
        "a time that reads as infinity",
        PY_PATH,
        raw_body(time_from="1e400"),
        400,
        status(400, "BadRequest", "from must be a finite number, got inf"),
    ),
    Row(
        "epoch milliseconds past int64",
        PY_PATH,
        raw_body(time_from=str(2**63)),
        400,
        status(400, "BadRequest", "from is out of range"),
    ),
    Row(
        "a relative time past the calendar",
        PY_PATH,
        raw_body(time_from='"now-99999999999y"'),
        400,
        status(400, "BadRequest", "from 'now-99999999999y' is out of range"),
    ),
    Row(
        "a time of digits int() does not read",
        PY_PATH,
        raw_body(time_from='"\u00b2"'),
        400,
        status(400, "BadRequest", "from '\u00b2' is not a time"),
    ),
    Row(
        "maxDataPoints past int64",
        PY_PATH,
        raw_body(query=f'"maxDataPoints": {2**63}'),
        400,
        status(400, "BadRequest", "queries[0].maxDataPoints is out of range"),
    ),
    Row(
        "intervalMs past int64",
        PY_PATH,
        raw_body(query='"intervalMs": 1e300'),
        400,
        status(400, "BadRequest", "queries[0].intervalMs is out of range"),
    ),
    Row(
        "no datasource reference",
        PY_PATH,
        request_body(None, {"refId": "A"}),
        400,
        status(400, "BadRequest", "missing datasource reference"),
    ),
    Row(
        "datasource reference of another type",
        PY_PATH,
        request_body(ref(GO, "py"), {"refId": "A"}),
        400,
        status(400, "BadRequest", f"invalid datasource type '{GO}'"),
    ),
    Row(
        "datasource uid other than the path's",
        PY_PATH,
        request_body(ref(PY, "other"), {"refId": "A"}),
        400,
        status(400, "BadRequest", "invalid datasource UID 'other'"),
    ),
    Row(
        "unknown datasource uid",
        query_path(PY_GROUP, "nope"),
        request_body(ref(PY, "nope"), {"refId": "A"}),
        404,
        status(404, "NotFound", "datasource 'nope' not found in org 1"),
    ),
    Row(
        "another plugin's datasource",
        query_path(PY_GROUP, "go"),
        request_body(ref(PY, "go"), {"refId": "A"}),
        404,
        status(404, "NotFound", f"datasource 'go' in org 1 is a '{GO}' datasource, not '{PY}'"),
    ),
    Row(
        "GET on query",
        PY_PATH,
        None,
        405,
        status_with_allow(405, "MethodNotAllowed", "method GET is not allowed here", "POST"),
        method="GET",
    ),
    Row(
        "body over limits.max_body_bytes",
        PY_PATH,
        request_body(ref(PY, "py"), {"refId": "A", "padding": "x" * MAX_BODY}),
        413,
        status(413, "RequestEntityTooLarge", "Request Entity Too Large"),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_query(door: FrontDoor, row: Row) -> None:
    if isinstance(row.body, bytes):
        answer = await door.call(
            row.method, row.path, data=row.body, headers={"Content-Type": "application/json"}
        )
    else:
        answer = await door.call(row.method, row.path, body=row.body)
    assert answer.status == row.status, answer.text
    row.check(answer)


async def test_arrow_frames_read_like_the_json_ones(door: FrontDoor) -> None:
    """The same queries, answered once in the SDK's JSON and once in Arrow, read the same.

    ``special`` puts NaN, +Inf, -Inf and null in the values and nanoseconds in the times,
    the parts of the conversion most easily got wrong. The one difference is documented
    (docs/frames.md): Arrow metadata is re-encoded as Grafana's ``FrameMeta``, which always
    has ``typeVersion``, while JSON frames pass through as the plugin wrote them.
    """
    queries = (
        {"refId": "B", "points": 6, "special": True, "labels": {"host": "a"}},
        {"refId": "A", "points": 3, "queryType": "metrics"},
        {"refId": "C", "error": "no such metric", "errorSource": "downstream"},
    )
    as_json = await door.call("POST", PY_PATH, body=request_body(ref(PY, "py"), *queries))
    as_arrow = await door.call(
        "POST", query_path(ARROW_GROUP, "arrow"), body=request_body(ref(ARROW, "arrow"), *queries)
    )
    assert (as_json.status, as_arrow.status) == (207, 207), as_arrow.text
    converted = as_arrow.json()
    for ref_id in ("A", "B"):
        (frame,) = converted["results"][ref_id]["frames"]
        assert frame["schema"]["meta"].pop("typeVersion") == [0, 0]
    assert converted == as_json.json()
    data = converted["results"]["B"]["frames"][0]["data"]
    assert data["values"][1] == [None, None, None, None, 4, 5]
    assert data["entities"][1] == {"NaN": [0], "Inf": [1], "NegInf": [2]}
    assert data["nanos"][0] == [7 * (i + 1) for i in range(6)]
