"""The typed client against a real plugin process: every rpc, deadlines, and error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pytest

from plugin_host.client import BackendClient, clamp_message_bytes, open_channel
from plugin_host.errors import (
    ErrorSource,
    MessageTooLarge,
    NotImplementedByPlugin,
    PluginInternalError,
    PluginTimeout,
    PluginUnavailable,
)
from plugin_host.process import PluginProcess
from protos.pluginv2 import backend_pb2 as pb
from tests.helpers import PY_FIXTURE, PY_FIXTURE_ID, plugin_env


async def launch(workdir: Path, behaviour: str = "") -> tuple[PluginProcess, BackendClient]:
    process = await PluginProcess.start(
        plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env(behaviour), workdir=workdir
    )
    return process, BackendClient(
        PY_FIXTURE_ID, open_channel(process.handshake.grpc_target), default_timeout=10
    )


@pytest.fixture
async def plugin(short_tmp: Path) -> AsyncIterator[BackendClient]:
    process, client = await launch(short_tmp / "p")
    try:
        yield client
    finally:
        await process.stop(grace=3.0, request_shutdown=client.shutdown)
        await client.close()


def ctx() -> pb.PluginContext:
    return pb.PluginContext(
        orgId=1,
        pluginId=PY_FIXTURE_ID,
        dataSourceInstanceSettings=pb.DataSourceInstanceSettings(id=7, uid="ds1", name="fixture"),
    )


def query(ref: str, model: dict[str, object], points: int = 5) -> pb.DataQuery:
    return pb.DataQuery(
        refId=ref,
        maxDataPoints=points,
        intervalMS=1000,
        timeRange=pb.TimeRange(fromEpochMS=1_700_000_000_000, toEpochMS=1_700_000_060_000),
        json=json.dumps(model).encode(),
    )


async def test_reflection_lists_pluginv2_services(plugin: BackendClient) -> None:
    services = await plugin.served_services()
    assert services == frozenset(
        {
            "pluginv2.Resource",
            "pluginv2.Data",
            "pluginv2.Diagnostics",
            "pluginv2.Stream",
            "pluginv2.AdmissionControl",
            "pluginv2.ResourceConversion",
        }
    )


async def test_query_data_json_and_arrow(plugin: BackendClient) -> None:
    as_json = await plugin.query_data(
        pb.QueryDataRequest(
            pluginContext=ctx(), queries=[query("A", {"points": 4})], format=pb.JSON
        )
    )
    frame = json.loads(as_json.responses["A"].frames[0])
    assert as_json.responses["A"].format == pb.JSON
    assert as_json.responses["A"].status == 200
    assert len(frame["data"]["values"][0]) == 4

    as_arrow = await plugin.query_data(
        pb.QueryDataRequest(
            pluginContext=ctx(), queries=[query("B", {"points": 3})], format=pb.ARROW
        )
    )
    raw = as_arrow.responses["B"].frames[0]
    assert raw[:6] == b"ARROW1"
    table = pyarrow.ipc.open_file(pa.BufferReader(raw)).read_all()
    assert table.num_rows == 3
    assert table.schema.metadata[b"refId"] == b"B"
    assert pa.types.is_timestamp(table.schema.field(0).type)


async def test_per_query_errors_keep_their_source(plugin: BackendClient) -> None:
    answer = await plugin.query_data(
        pb.QueryDataRequest(
            pluginContext=ctx(),
            queries=[
                query("ok", {}),
                query("bad", {"error": "upstream said no", "errorSource": "downstream"}),
            ],
            format=pb.JSON,
        )
    )
    assert answer.responses["ok"].status == 200
    bad = answer.responses["bad"]
    assert (bad.error, bad.errorSource, bad.status) == ("upstream said no", "downstream", 400)


@pytest.mark.parametrize("source", [ErrorSource.DOWNSTREAM, ErrorSource.PLUGIN])
async def test_request_error_maps_to_plugin_internal_error_with_source(
    plugin: BackendClient, source: ErrorSource
) -> None:
    with pytest.raises(PluginInternalError) as info:
        await plugin.query_data(
            pb.QueryDataRequest(
                pluginContext=ctx(),
                queries=[query("A", {"requestError": "db down", "errorSource": str(source)})],
            )
        )
    assert info.value.error_source is source
    assert info.value.grpc_code == "UNKNOWN"
    assert "db down" in info.value.message
    assert info.value.method == "QueryData"


async def test_query_chunked_data_streams(plugin: BackendClient) -> None:
    chunks = [
        c
        async for c in plugin.query_chunked_data(
            pb.QueryChunkedDataRequest(
                pluginContext=ctx(), queries=[query("A", {"chunks": 3})], format=pb.JSON
            )
        )
    ]
    assert len(chunks) >= 3
    assert {c.refId for c in chunks} == {"A"}


async def test_call_resource_streams_first_message_with_code(plugin: BackendClient) -> None:
    messages = [
        m
        async for m in plugin.call_resource(
            pb.CallResourceRequest(
                pluginContext=ctx(), method="GET", path="stream", url="stream?chunks=4"
            )
        )
    ]
    assert len(messages) == 4
    assert messages[0].code == 200 and "Content-Type" in {k.title() for k in messages[0].headers}
    assert all(m.code == 0 and not m.headers for m in messages[1:])

    [echo] = [
        m
        async for m in plugin.call_resource(
            pb.CallResourceRequest(
                pluginContext=ctx(),
                method="POST",
                path="echo",
                url="echo?x=1",
                headers={"X-Test": pb.StringList(values=["a", "b"])},
                body=b"hello",
            )
        )
    ]
    seen = json.loads(echo.body)
    assert seen["method"] == "POST" and seen["url"] == "echo?x=1" and seen["body"] == "hello"


async def test_health_metrics_and_streams(plugin: BackendClient) -> None:
    health = await plugin.check_health(pb.CheckHealthRequest(pluginContext=ctx()))
    assert health.status == pb.CheckHealthResponse.OK
    metrics = await plugin.collect_metrics(pb.CollectMetricsRequest(pluginContext=ctx()))
    assert b"# TYPE" in metrics.metrics.prometheus

    sub = await plugin.subscribe_stream(
        pb.SubscribeStreamRequest(pluginContext=ctx(), path="ticks")
    )
    assert sub.status == pb.SubscribeStreamResponse.OK
    denied = await plugin.subscribe_stream(
        pb.SubscribeStreamRequest(pluginContext=ctx(), path="denied")
    )
    assert denied.status == pb.SubscribeStreamResponse.PERMISSION_DENIED
    published = await plugin.publish_stream(
        pb.PublishStreamRequest(pluginContext=ctx(), path="ticks", data=b'{"a":1}')
    )
    assert published.status == pb.PublishStreamResponse.OK

    packets = []
    async for packet in plugin.run_stream(
        pb.RunStreamRequest(pluginContext=ctx(), path="ticks", data=b'{"intervalMs": 20}')
    ):
        packets.append(json.loads(packet.data))
        if len(packets) == 3:
            break
    assert len(packets) == 3


async def test_admission_and_conversion(plugin: BackendClient) -> None:
    obj = {
        "apiVersion": "a.example/v1",
        "kind": "Thing",
        "metadata": {"name": "x"},
        "spec": {"deny": True},
    }
    request = pb.AdmissionRequest(
        pluginContext=ctx(),
        operation=pb.AdmissionRequest.CREATE,
        kind=pb.GroupVersionKind(group="a.example", version="v1", kind="Thing"),
        object_bytes=json.dumps(obj).encode(),
    )
    verdict = await plugin.validate_admission(request)
    assert not verdict.allowed and verdict.result.code == 403
    obj["spec"] = {}
    request.object_bytes = json.dumps(obj).encode()
    mutated = await plugin.mutate_admission(request)
    assert mutated.allowed and json.loads(mutated.object_bytes) != obj

    converted = await plugin.convert_objects(
        pb.ConversionRequest(
            pluginContext=ctx(),
            uid="u1",
            objects=[pb.RawObject(raw=json.dumps(obj).encode(), content_type="application/json")],
            target_version=pb.GroupVersion(group="a.example", version="v2"),
        )
    )
    assert converted.uid == "u1"
    assert json.loads(converted.objects[0].raw)["apiVersion"] == "a.example/v2"


async def test_unimplemented_service_maps_to_not_implemented(short_tmp: Path) -> None:
    process, client = await launch(short_tmp / "p", "only=diagnostics")
    try:
        assert await client.served_services() == frozenset({"pluginv2.Diagnostics"})
        with pytest.raises(NotImplementedByPlugin) as info:
            await client.query_data(
                pb.QueryDataRequest(pluginContext=ctx(), queries=[query("A", {})])
            )
        assert info.value.method == "QueryData"
        with pytest.raises(NotImplementedByPlugin):
            [
                m
                async for m in client.call_resource(
                    pb.CallResourceRequest(pluginContext=ctx(), path="echo")
                )
            ]
    finally:
        await process.stop(grace=3.0, request_shutdown=client.shutdown)
        await client.close()


async def test_deadline_on_a_hanging_plugin(short_tmp: Path) -> None:
    process, client = await launch(short_tmp / "p", "hang")
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(PluginTimeout, match="QueryData: no answer before the deadline"):
            await client.query_data(
                pb.QueryDataRequest(pluginContext=ctx(), queries=[query("A", {})]), timeout=0.5
            )
        assert loop.time() - began < 2.0
        with pytest.raises(PluginTimeout):
            [
                m
                async for m in client.call_resource(
                    pb.CallResourceRequest(pluginContext=ctx(), path="echo"), timeout=0.3
                )
            ]
    finally:
        await process.stop(grace=1.0, request_shutdown=client.shutdown)
        await client.close()


async def test_huge_response_beyond_grpc_default_limit(short_tmp: Path) -> None:
    size = 20 * 2**20  # five times grpc's default 4 MiB receive limit
    process, client = await launch(short_tmp / "p", f"huge_response={size}")
    try:
        [message] = [
            m
            async for m in client.call_resource(
                pb.CallResourceRequest(pluginContext=ctx(), path="echo")
            )
        ]
        assert len(message.body) == size
    finally:
        await process.stop(grace=3.0, request_shutdown=client.shutdown)
        await client.close()


async def test_an_answer_over_the_configured_limit_fails_only_that_call(short_tmp: Path) -> None:
    process = await PluginProcess.start(
        plugin_id=PY_FIXTURE_ID,
        executable=PY_FIXTURE,
        env=plugin_env(f"huge_response={3 * 2**20}"),
        workdir=short_tmp / "p",
    )
    client = BackendClient(
        PY_FIXTURE_ID,
        open_channel(process.handshake.grpc_target, max_message_bytes=2 * 2**20),
        default_timeout=10,
    )
    try:
        request = pb.CallResourceRequest(pluginContext=ctx(), path="echo")
        with pytest.raises(MessageTooLarge):
            [m async for m in client.call_resource(request)]
        # The plugin and the channel are still usable for calls within the limit.
        health = await client.check_health(pb.CheckHealthRequest(pluginContext=ctx()))
        assert health.status == pb.CheckHealthResponse.OK
    finally:
        await process.stop(grace=3.0, request_shutdown=client.shutdown)
        await client.close()


def test_message_limits_are_clamped_to_what_grpc_accepts() -> None:
    assert clamp_message_bytes(0) == 2**20
    assert clamp_message_bytes(64 * 2**20) == 64 * 2**20
    assert clamp_message_bytes(2**40) == 2**31 - 1


async def test_dead_plugin_is_unavailable(short_tmp: Path) -> None:
    process, client = await launch(short_tmp / "p")
    process.kill()
    await process.wait()
    with pytest.raises(PluginUnavailable):
        await client.check_health(pb.CheckHealthRequest(pluginContext=ctx()), timeout=2)
    await process.stop(grace=0.1)
    await client.close()


async def test_closing_the_channel_under_a_call_is_plugin_unavailable(short_tmp: Path) -> None:
    process, client = await launch(short_tmp / "p", "hang")
    try:
        unary = asyncio.create_task(
            client.query_data(pb.QueryDataRequest(pluginContext=ctx(), queries=[query("A", {})]))
        )

        async def stream() -> list[pb.CallResourceResponse]:
            request = pb.CallResourceRequest(pluginContext=ctx(), path="echo")
            return [m async for m in client.call_resource(request)]

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(0.3)
        await client.close()  # what the supervisor does when the plugin goes away
        # The callers' own tasks were not cancelled: they must not see CancelledError.
        for task in (unary, streaming):
            with pytest.raises(PluginUnavailable, match="connection to the plugin is closed"):
                await task
            assert not task.cancelled()
        # Calls on the closed channel: a plugin error, not grpc's UsageError.
        with pytest.raises(PluginUnavailable, match="connection to the plugin is closed"):
            await client.check_health(pb.CheckHealthRequest(pluginContext=ctx()))
        with pytest.raises(PluginUnavailable):
            await client.served_services()
    finally:
        await process.stop(grace=0.5)


async def test_cancelling_the_caller_still_cancels(short_tmp: Path) -> None:
    process, client = await launch(short_tmp / "p", "hang")
    try:
        call = asyncio.create_task(
            client.query_data(pb.QueryDataRequest(pluginContext=ctx(), queries=[query("A", {})]))
        )
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled()
    finally:
        await process.stop(grace=0.5)
        await client.close()
