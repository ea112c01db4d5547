"""Drift guard for the wire contract in protos/: generated code and the schema itself."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor

from protos.plugin import grpc_broker_pb2, grpc_controller_pb2, grpc_stdio_pb2
from protos.pluginv2 import backend_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"

# Expected schema, typed in by hand from plugin-protocol.md §1.3 and §2.3, in the reference's
# own notation: `T[]` is repeated, `map<K,V>` is a proto map, message and enum types are named
# relative to their package.
PLUGINV2_MESSAGES: dict[str, list[tuple[int, str, str]]] = {
    "AppInstanceSettings": [
        (3, "jsonData", "bytes"),
        (4, "decryptedSecureJsonData", "map<string,string>"),
        (5, "lastUpdatedMS", "int64"),
        (6, "apiVersion", "string"),
    ],
    "DataSourceInstanceSettings": [
        (1, "id", "int64"),
        (2, "name", "string"),
        (3, "url", "string"),
        (4, "user", "string"),
        (5, "database", "string"),
        (6, "basicAuthEnabled", "bool"),
        (7, "basicAuthUser", "string"),
        (8, "jsonData", "bytes"),
        (9, "decryptedSecureJsonData", "map<string,string>"),
        (10, "lastUpdatedMS", "int64"),
        (11, "uid", "string"),
        (12, "apiVersion", "string"),
    ],
    "User": [
        (1, "login", "string"),
        (2, "name", "string"),
        (3, "email", "string"),
        (4, "role", "string"),
    ],
    "PluginContext": [
        (1, "orgId", "int64"),
        (2, "pluginId", "string"),
        (3, "user", "User"),
        (4, "appInstanceSettings", "AppInstanceSettings"),
        (5, "dataSourceInstanceSettings", "DataSourceInstanceSettings"),
        (6, "grafanaConfig", "map<string,string>"),
        (7, "pluginVersion", "string"),
        (8, "userAgent", "string"),
        (9, "apiVersion", "string"),
        (10, "namespace", "string"),
    ],
    "StringList": [(1, "values", "string[]")],
    "CallResourceRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "path", "string"),
        (3, "method", "string"),
        (4, "url", "string"),
        (5, "headers", "map<string,StringList>"),
        (6, "body", "bytes"),
    ],
    "CallResourceResponse": [
        (1, "code", "int32"),
        (2, "headers", "map<string,StringList>"),
        (3, "body", "bytes"),
    ],
    "TimeRange": [(1, "fromEpochMS", "int64"), (2, "toEpochMS", "int64")],
    "DataQuery": [
        (1, "refId", "string"),
        (2, "maxDataPoints", "int64"),
        (3, "intervalMS", "int64"),
        (4, "timeRange", "TimeRange"),
        (5, "json", "bytes"),
        (6, "queryType", "string"),
    ],
    "QueryDataRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "headers", "map<string,string>"),
        (3, "queries", "DataQuery[]"),
        (4, "format", "DataFrameFormat"),
    ],
    "QueryDataResponse": [(1, "responses", "map<string,DataResponse>")],
    "DataResponse": [
        (1, "frames", "bytes[]"),
        (2, "error", "string"),
        (3, "jsonMeta", "bytes"),
        (4, "status", "int32"),
        (5, "errorSource", "string"),
        (6, "format", "DataFrameFormat"),
    ],
    "QueryChunkedDataRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "headers", "map<string,string>"),
        (3, "queries", "DataQuery[]"),
        (4, "format", "DataFrameFormat"),
    ],
    "QueryChunkedDataResponse": [
        (1, "refId", "string"),
        (2, "frameId", "string"),
        (3, "frame", "bytes"),
        (4, "error", "string"),
        (5, "status", "int32"),
        (6, "errorSource", "string"),
        (7, "format", "DataFrameFormat"),
    ],
    "CollectMetricsRequest": [(1, "pluginContext", "PluginContext")],
    "CollectMetricsResponse": [(1, "metrics", "CollectMetricsResponse.Payload")],
    "CollectMetricsResponse.Payload": [(1, "prometheus", "bytes")],
    "CheckHealthRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "headers", "map<string,string>"),
    ],
    "CheckHealthResponse": [
        (1, "status", "CheckHealthResponse.HealthStatus"),
        (2, "message", "string"),
        (3, "jsonDetails", "bytes"),
    ],
    "SubscribeStreamRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "path", "string"),
        (3, "data", "bytes"),
        (4, "headers", "map<string,string>"),
    ],
    "SubscribeStreamResponse": [
        (1, "status", "SubscribeStreamResponse.Status"),
        (2, "data", "bytes"),
    ],
    "PublishStreamRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "path", "string"),
        (3, "data", "bytes"),
        (4, "headers", "map<string,string>"),
    ],
    "PublishStreamResponse": [
        (1, "status", "PublishStreamResponse.Status"),
        (2, "data", "bytes"),
    ],
    "RunStreamRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "path", "string"),
        (3, "data", "bytes"),
        (4, "headers", "map<string,string>"),
    ],
    "StreamPacket": [(1, "data", "bytes")],
    "GroupVersionKind": [(1, "group", "string"), (2, "version", "string"), (3, "kind", "string")],
    "AdmissionRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "operation", "AdmissionRequest.Operation"),
        (3, "kind", "GroupVersionKind"),
        (4, "object_bytes", "bytes"),
        (5, "old_object_bytes", "bytes"),
    ],
    "ValidationResponse": [
        (1, "allowed", "bool"),
        (2, "result", "StatusResult"),
        (3, "warnings", "string[]"),
    ],
    "MutationResponse": [
        (1, "allowed", "bool"),
        (2, "result", "StatusResult"),
        (3, "warnings", "string[]"),
        (4, "object_bytes", "bytes"),
    ],
    "GroupVersion": [(1, "group", "string"), (2, "version", "string")],
    "RawObject": [(1, "raw", "bytes"), (2, "content_type", "string")],
    "ConversionRequest": [
        (1, "pluginContext", "PluginContext"),
        (2, "uid", "string"),
        (3, "objects", "RawObject[]"),
        (4, "target_version", "GroupVersion"),
    ],
    "ConversionResponse": [
        (1, "uid", "string"),
        (2, "result", "StatusResult"),
        (3, "objects", "RawObject[]"),
    ],
    "StatusResult": [
        (1, "status", "string"),
        (2, "message", "string"),
        (3, "reason", "string"),
        (4, "code", "int32"),
    ],
}

PLUGINV2_ENUMS: dict[str, list[tuple[str, int]]] = {
    "DataFrameFormat": [("ARROW", 0), ("JSON", 1)],
    "CheckHealthResponse.HealthStatus": [("UNKNOWN", 0), ("OK", 1), ("ERROR", 2)],
    "SubscribeStreamResponse.Status": [("OK", 0), ("NOT_FOUND", 1), ("PERMISSION_DENIED", 2)],
    "PublishStreamResponse.Status": [("OK", 0), ("NOT_FOUND", 1), ("PERMISSION_DENIED", 2)],
    "AdmissionRequest.Operation": [("CREATE", 0), ("UPDATE", 1), ("DELETE", 2)],
}

PLUGIN_MESSAGES: dict[str, list[tuple[int, str, str]]] = {
    "Empty": [],
    "StdioData": [(1, "channel", "StdioData.Channel"), (2, "data", "bytes")],
    "ConnInfo": [
        (1, "service_id", "uint32"),
        (2, "network", "string"),
        (3, "address", "string"),
        (4, "knock", "ConnInfo.Knock"),
    ],
    "ConnInfo.Knock": [(1, "knock", "bool"), (2, "ack", "bool"), (3, "error", "string")],
}

PLUGIN_ENUMS: dict[str, list[tuple[str, int]]] = {
    "StdioData.Channel": [("INVALID", 0), ("STDOUT", 1), ("STDERR", 2)],
}

UNARY = "unary"
SERVER_STREAM = "server-streaming"
BIDI = "bidi"

# (full method name, request type, response type, kind); types by full name.
METHODS: list[tuple[str, str, str, str]] = [
    (
        "/pluginv2.Resource/CallResource",
        "pluginv2.CallResourceRequest",
        "pluginv2.CallResourceResponse",
        SERVER_STREAM,
    ),
    ("/pluginv2.Data/QueryData", "pluginv2.QueryDataRequest", "pluginv2.QueryDataResponse", UNARY),
    (
        "/pluginv2.Data/QueryChunkedData",
        "pluginv2.QueryChunkedDataRequest",
        "pluginv2.QueryChunkedDataResponse",
        SERVER_STREAM,
    ),
    (
        "/pluginv2.Diagnostics/CheckHealth",
        "pluginv2.CheckHealthRequest",
        "pluginv2.CheckHealthResponse",
        UNARY,
    ),
    (
        "/pluginv2.Diagnostics/CollectMetrics",
        "pluginv2.CollectMetricsRequest",
        "pluginv2.CollectMetricsResponse",
        UNARY,
    ),
    (
        "/pluginv2.Stream/SubscribeStream",
        "pluginv2.SubscribeStreamRequest",
        "pluginv2.SubscribeStreamResponse",
        UNARY,
    ),
    (
        "/pluginv2.Stream/RunStream",
        "pluginv2.RunStreamRequest",
        "pluginv2.StreamPacket",
        SERVER_STREAM,
    ),
    (
        "/pluginv2.Stream/PublishStream",
        "pluginv2.PublishStreamRequest",
        "pluginv2.PublishStreamResponse",
        UNARY,
    ),
    (
        "/pluginv2.AdmissionControl/ValidateAdmission",
        "pluginv2.AdmissionRequest",
        "pluginv2.ValidationResponse",
        UNARY,
    ),
    (
        "/pluginv2.AdmissionControl/MutateAdmission",
        "pluginv2.AdmissionRequest",
        "pluginv2.MutationResponse",
        UNARY,
    ),
    (
        "/pluginv2.ResourceConversion/ConvertObjects",
        "pluginv2.ConversionRequest",
        "pluginv2.ConversionResponse",
        UNARY,
    ),
    ("/plugin.GRPCController/Shutdown", "plugin.Empty", "plugin.Empty", UNARY),
    ("/plugin.GRPCStdio/StreamStdio", "google.protobuf.Empty", "plugin.StdioData", SERVER_STREAM),
    ("/plugin.GRPCBroker/StartStream", "plugin.ConnInfo", "plugin.ConnInfo", BIDI),
]

PLUGINV2_SERVICES = [
    "Resource",
    "Data",
    "Diagnostics",
    "Stream",
    "AdmissionControl",
    "ResourceConversion",
]

_SCALARS: dict[int, str] = {
    descriptor.FieldDescriptor.TYPE_STRING: "string",
    descriptor.FieldDescriptor.TYPE_BYTES: "bytes",
    descriptor.FieldDescriptor.TYPE_BOOL: "bool",
    descriptor.FieldDescriptor.TYPE_INT32: "int32",
    descriptor.FieldDescriptor.TYPE_INT64: "int64",
    descriptor.FieldDescriptor.TYPE_UINT32: "uint32",
}


def _relative(full_name: str, package: str) -> str:
    return full_name.removeprefix(package + ".")


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    msg = field.message_type
    return msg is not None and msg.GetOptions().map_entry


def _render_type(field: descriptor.FieldDescriptor, package: str) -> str:
    """A field's type in the reference's notation."""
    msg = field.message_type
    if msg is not None and msg.GetOptions().map_entry:
        key = _render_type(msg.fields_by_name["key"], package)
        value = _render_type(msg.fields_by_name["value"], package)
        return f"map<{key},{value}>"
    if msg is not None:
        base = _relative(msg.full_name, package)
    elif field.enum_type is not None:
        base = _relative(field.enum_type.full_name, package)
    else:
        base = _SCALARS[field.type]
    return base + "[]" if field.is_repeated else base


def _all_messages(desc: descriptor.Descriptor) -> list[descriptor.Descriptor]:
    found = [desc]
    for nested in desc.nested_types:
        if not nested.GetOptions().map_entry:
            found.extend(_all_messages(nested))
    return found


def _all_enums(file: descriptor.FileDescriptor) -> list[descriptor.EnumDescriptor]:
    enums = list(file.enum_types_by_name.values())
    for top in file.message_types_by_name.values():
        for msg in _all_messages(top):
            enums.extend(msg.enum_types)
    return enums


def _messages_of(*files: descriptor.FileDescriptor) -> dict[str, descriptor.Descriptor]:
    out: dict[str, descriptor.Descriptor] = {}
    for file in files:
        for top in file.message_types_by_name.values():
            for msg in _all_messages(top):
                out[_relative(msg.full_name, file.package)] = msg
    return out


def _load_gen_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", GEN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- generated code is current and reproducible ----


def test_generated_code_matches_proto_sources() -> None:
    result = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_check_mode_reports_drifted_file(tmp_path: Path) -> None:
    gen = _load_gen_script()
    gen.generate(tmp_path)
    assert gen.drifted(tmp_path) == []
    stale = tmp_path / "protos" / "plugin" / "grpc_stdio_pb2.pyi"
    stale.write_bytes(stale.read_bytes() + b"\n")
    assert gen.drifted(tmp_path) == ["protos/plugin/grpc_stdio_pb2.pyi"]


def test_generated_imports_are_absolute() -> None:
    text = (REPO_ROOT / "protos" / "pluginv2" / "backend_pb2_grpc.py").read_text()
    assert "from protos.pluginv2 import backend_pb2 as" in text


# ---- schema drift guard against the SDK (reference §1) ----


def test_backend_file_options() -> None:
    file = backend_pb2.DESCRIPTOR
    assert file.package == "pluginv2"
    assert file.GetOptions().go_package == "./;pluginv2"
    assert list(file.dependencies) == []
    assert list(file.services_by_name) == PLUGINV2_SERVICES


def test_plugin_files_options() -> None:
    for module in (grpc_controller_pb2, grpc_stdio_pb2, grpc_broker_pb2):
        assert module.DESCRIPTOR.package == "plugin"
        assert module.DESCRIPTOR.GetOptions().go_package == "./;plugin"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param((backend_pb2.DESCRIPTOR,), PLUGINV2_MESSAGES, id="pluginv2"),
        pytest.param(
            (grpc_controller_pb2.DESCRIPTOR, grpc_stdio_pb2.DESCRIPTOR, grpc_broker_pb2.DESCRIPTOR),
            PLUGIN_MESSAGES,
            id="plugin",
        ),
    ],
)
def test_exactly_the_expected_messages(
    files: tuple[descriptor.FileDescriptor, ...], expected: dict[str, list[tuple[int, str, str]]]
) -> None:
    assert sorted(_messages_of(*files)) == sorted(expected)


@pytest.mark.parametrize(
    ("message", "fields"),
    [pytest.param(name, fields, id=name) for name, fields in PLUGINV2_MESSAGES.items()],
)
def test_pluginv2_message_fields(message: str, fields: list[tuple[int, str, str]]) -> None:
    desc = _messages_of(backend_pb2.DESCRIPTOR)[message]
    actual = [(f.number, f.name, _render_type(f, "pluginv2")) for f in desc.fields]
    assert sorted(actual) == sorted(fields)
    # No proto3 `optional`/oneof: the SDK's file has neither.
    assert list(desc.oneofs) == []


@pytest.mark.parametrize(
    ("message", "fields"),
    [pytest.param(name, fields, id=name) for name, fields in PLUGIN_MESSAGES.items()],
)
def test_plugin_message_fields(message: str, fields: list[tuple[int, str, str]]) -> None:
    files = (grpc_controller_pb2.DESCRIPTOR, grpc_stdio_pb2.DESCRIPTOR, grpc_broker_pb2.DESCRIPTOR)
    desc = _messages_of(*files)[message]
    actual = [(f.number, f.name, _render_type(f, "plugin")) for f in desc.fields]
    assert sorted(actual) == sorted(fields)


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        pytest.param(backend_pb2.DESCRIPTOR, PLUGINV2_ENUMS, id="pluginv2"),
        pytest.param(grpc_stdio_pb2.DESCRIPTOR, PLUGIN_ENUMS, id="plugin"),
    ],
)
def test_enums(file: descriptor.FileDescriptor, expected: dict[str, list[tuple[str, int]]]) -> None:
    actual = {
        _relative(enum.full_name, file.package): [(v.name, v.number) for v in enum.values]
        for enum in _all_enums(file)
    }
    assert actual == expected


def test_map_fields_are_maps_and_repeated_fields_are_not() -> None:
    maps = {
        (msg_name, f.name)
        for msg_name, msg in _messages_of(backend_pb2.DESCRIPTOR).items()
        for f in msg.fields
        if _is_map(f)
    }
    expected = {
        (msg, name)
        for msg, fields in PLUGINV2_MESSAGES.items()
        for _, name, type_ in fields
        if type_.startswith("map<")
    }
    assert maps == expected
    assert ("QueryDataResponse", "responses") in maps
    frames = backend_pb2.DataResponse.DESCRIPTOR.fields_by_name["frames"]
    assert frames.is_repeated and not _is_map(frames)


def test_wire_round_trip_keeps_mixed_case_names() -> None:
    req = backend_pb2.AdmissionRequest(
        operation=backend_pb2.AdmissionRequest.UPDATE,
        kind=backend_pb2.GroupVersionKind(group="g", version="v1", kind="K"),
        object_bytes=b"{}",
        old_object_bytes=b"[]",
    )
    req.pluginContext.pluginId = "x"
    decoded = backend_pb2.AdmissionRequest.FromString(req.SerializeToString())
    assert decoded == req
    assert decoded.old_object_bytes == b"[]"
    qdr = backend_pb2.QueryDataResponse()
    qdr.responses["A"].frames.append(b"frame")
    qdr.responses["A"].format = backend_pb2.JSON
    decoded_qdr = backend_pb2.QueryDataResponse.FromString(qdr.SerializeToString())
    assert decoded_qdr.responses["A"].format == backend_pb2.JSON
    assert list(decoded_qdr.responses["A"].frames) == [b"frame"]


# ---- services: full method names and streaming kinds ----


def _all_service_methods() -> dict[str, descriptor.MethodDescriptor]:
    out: dict[str, descriptor.MethodDescriptor] = {}
    for module in (backend_pb2, grpc_controller_pb2, grpc_stdio_pb2, grpc_broker_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out[f"/{service.full_name}/{method.name}"] = method
    return out


def _kind(method: descriptor.MethodDescriptor) -> str:
    if method.client_streaming and method.server_streaming:
        return BIDI
    if method.server_streaming:
        return SERVER_STREAM
    assert not method.client_streaming, "no client-streaming RPCs exist in this protocol"
    return UNARY


def test_exactly_the_expected_methods() -> None:
    assert sorted(_all_service_methods()) == sorted(name for name, *_ in METHODS)


@pytest.mark.parametrize(
    ("full_name", "request_type", "response_type", "kind"),
    [pytest.param(*row, id=row[0]) for row in METHODS],
)
def test_method_signature(full_name: str, request_type: str, response_type: str, kind: str) -> None:
    method = _all_service_methods()[full_name]
    assert method.input_type.full_name == request_type
    assert method.output_type.full_name == response_type
    assert _kind(method) == kind
