"""The typed async client for one plugin's pluginv2 services, with deadlines and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from plugin_host.errors import (
    ErrorSource,
    MessageTooLarge,
    NotImplementedByPlugin,
    PluginError,
    PluginInternalError,
    PluginTimeout,
    PluginUnavailable,
)
from protos.plugin import (
    grpc_controller_pb2,
    grpc_controller_pb2_grpc,
    grpc_stdio_pb2,
    grpc_stdio_pb2_grpc,
)
from protos.pluginv2 import backend_pb2 as pb
from protos.pluginv2 import backend_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# go-plugin's client allows messages up to 2 GiB - 1 both ways and Grafana adds no limit; we
# cap what a plugin may send us (plugins.max_message_mb), so one answer cannot exhaust memory.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
MAX_MESSAGE_BYTES_CEILING = 2**31 - 1  # gRPC's own ceiling (a signed 32-bit length)

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # The plugin sits on a local socket: reconnect quickly after it restarts.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

PLUGINV2_SERVICES = (
    "pluginv2.Resource",
    "pluginv2.Data",
    "pluginv2.Diagnostics",
    "pluginv2.Stream",
    "pluginv2.AdmissionControl",
    "pluginv2.ResourceConversion",
)

HEALTH_SERVICE = "plugin"


def open_channel(
    target: str,
    *,
    own_connection: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """An insecure channel to a plugin's socket, as Grafana uses (no AutoMTLS).

    With ``own_connection`` the channel never shares its connection with other channels to
    the same plugin: health checks on it do not queue behind long-running user calls.
    ``max_message_bytes`` caps each message either way, clamped to 1 MiB … 2 GiB - 1; a
    larger answer fails the call with :class:`MessageTooLarge` and leaves the plugin running.
    """
    limit = clamp_message_bytes(max_message_bytes)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        *CHANNEL_OPTIONS,
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(target, options=options)


def clamp_message_bytes(value: int) -> int:
    """A message limit within what gRPC accepts and a plugin can usefully answer (≥ 1 MiB)."""
    return max(2**20, min(value, MAX_MESSAGE_BYTES_CEILING))


def map_rpc_error(exc: grpc.aio.AioRpcError, *, plugin_id: str, method: str) -> PluginError:
    """Translate a gRPC failure into the host's exception tree."""
    code = exc.code()
    details = exc.details() or code.name.lower()
    if code is grpc.StatusCode.UNAVAILABLE:
        # gRPC's details name the socket path and the OS error: for the log, not for clients.
        log.warning("plugin %s: %s: plugin is unreachable: %s", plugin_id, method, details)
        return PluginUnavailable(
            plugin_id, f"{method}: plugin is unreachable (its connection failed or broke)"
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return PluginTimeout(plugin_id, f"{method}: no answer before the deadline", method=method)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return NotImplementedByPlugin(
            plugin_id, f"{method} is not implemented by the plugin", method=method
        )
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return MessageTooLarge(plugin_id, f"{method}: {details}", method=method)
    return PluginInternalError(
        plugin_id,
        details,
        method=method,
        grpc_code=code.name,
        error_source=_error_source(exc),
    )


def _error_source(exc: grpc.aio.AioRpcError) -> ErrorSource:
    """Read the SDK's ``errorSource`` from a ``google.rpc.ErrorInfo`` in the status details."""
    metadata = cast(Sequence[tuple[str, str | bytes]], exc.trailing_metadata() or ())
    for key, value in metadata:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:
            return ErrorSource.UNKNOWN
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                source = info.metadata.get("errorSource", "")
                if source in (ErrorSource.PLUGIN, ErrorSource.DOWNSTREAM):
                    return ErrorSource(source)
    return ErrorSource.UNKNOWN


class BackendClient:
    """One plugin's pluginv2 services as typed async methods.

    Built from a channel, so it works the same for a plugin this process launched and for one
    it attached to. Every unary call has a deadline (``default_timeout`` unless given);
    streaming calls take an optional one. Failures raise :mod:`plugin_host.errors` types.
    """

    def __init__(
        self,
        plugin_id: str,
        channel: grpc.aio.Channel,
        *,
        default_timeout: float = 30.0,
        unavailable: Callable[[], PluginError | None] | None = None,
    ) -> None:
        self.plugin_id = plugin_id
        self.default_timeout = default_timeout
        self._channel = channel
        self._unavailable = unavailable
        self._data = pb_grpc.DataStub(channel)
        self._resource = pb_grpc.ResourceStub(channel)
        self._diagnostics = pb_grpc.DiagnosticsStub(channel)
        self._stream = pb_grpc.StreamStub(channel)
        self._admission = pb_grpc.AdmissionControlStub(channel)
        self._conversion = pb_grpc.ResourceConversionStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._controller = grpc_controller_pb2_grpc.GRPCControllerStub(channel)
        self._stdio = grpc_stdio_pb2_grpc.GRPCStdioStub(channel)

    async def close(self, grace: float | None = None) -> None:
        """Close the connection; calls still running get ``grace`` seconds, then fail."""
        await self._channel.close(grace)

    # -- pluginv2.Data ---------------------------------------------------------------------

    async def query_data(
        self, request: pb.QueryDataRequest, *, timeout: float | None = None
    ) -> pb.QueryDataResponse:
        return await self._unary("QueryData", self._data.QueryData, request, timeout)

    def query_chunked_data(
        self, request: pb.QueryChunkedDataRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.QueryChunkedDataResponse]:
        return self._streaming("QueryChunkedData", self._data.QueryChunkedData, request, timeout)

    # -- pluginv2.Resource -----------------------------------------------------------------

    def call_resource(
        self, request: pb.CallResourceRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.CallResourceResponse]:
        """The response as it streams: the first message carries code and headers."""
        return self._streaming("CallResource", self._resource.CallResource, request, timeout)

    # -- pluginv2.Diagnostics --------------------------------------------------------------

    async def check_health(
        self, request: pb.CheckHealthRequest, *, timeout: float | None = None
    ) -> pb.CheckHealthResponse:
        return await self._unary("CheckHealth", self._diagnostics.CheckHealth, request, timeout)

    async def collect_metrics(
        self, request: pb.CollectMetricsRequest, *, timeout: float | None = None
    ) -> pb.CollectMetricsResponse:
        return await self._unary(
            "CollectMetrics", self._diagnostics.CollectMetrics, request, timeout
        )

    # -- pluginv2.Stream -------------------------------------------------------------------

    async def subscribe_stream(
        self, request: pb.SubscribeStreamRequest, *, timeout: float | None = None
    ) -> pb.SubscribeStreamResponse:
        return await self._unary("SubscribeStream", self._stream.SubscribeStream, request, timeout)

    async def publish_stream(
        self, request: pb.PublishStreamRequest, *, timeout: float | None = None
    ) -> pb.PublishStreamResponse:
        return await self._unary("PublishStream", self._stream.PublishStream, request, timeout)

    def run_stream(
        self, request: pb.RunStreamRequest, *, timeout: float | None = None
    ) -> AsyncIterator[pb.StreamPacket]:
        """Packets until the plugin ends the stream or the caller stops iterating.

        Unlike unary calls there is no default deadline: a Live stream lives as long as it
        has subscribers. Closing the iterator cancels the call on the plugin.
        """
        return self._streaming("RunStream", self._stream.RunStream, request, timeout, default=False)

    # -- pluginv2.AdmissionControl ---------------------------------------------------------

    async def validate_admission(
        self, request: pb.AdmissionRequest, *, timeout: float | None = None
    ) -> pb.ValidationResponse:
        return await self._unary(
            "ValidateAdmission", self._admission.ValidateAdmission, request, timeout
        )

    async def mutate_admission(
        self, request: pb.AdmissionRequest, *, timeout: float | None = None
    ) -> pb.MutationResponse:
        return await self._unary(
            "MutateAdmission", self._admission.MutateAdmission, request, timeout
        )

    # -- pluginv2.ResourceConversion -------------------------------------------------------

    async def convert_objects(
        self, request: pb.ConversionRequest, *, timeout: float | None = None
    ) -> pb.ConversionResponse:
        return await self._unary(
            "ConvertObjects", self._conversion.ConvertObjects, request, timeout
        )

    # -- go-plugin's own services ----------------------------------------------------------

    async def ping(self, *, timeout: float = 5.0) -> bool:
        """go-plugin's health check (service ``plugin``); False if not SERVING."""
        response = await self._unary(
            "Health/Check",
            self._health.Check,
            health_pb2.HealthCheckRequest(service=HEALTH_SERVICE),
            timeout,
            check_available=False,
        )
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self, *, timeout: float = 2.0) -> None:
        """Ask the plugin to exit (``plugin.GRPCController/Shutdown``)."""
        await self._unary(
            "Shutdown",
            self._controller.Shutdown,
            grpc_controller_pb2.Empty(),
            timeout,
            check_available=False,
        )

    def stream_stdio(self) -> AsyncIterator[grpc_stdio_pb2.StdioData]:
        """What the plugin writes to stdout/stderr after serving began (go-plugin >= 1.3)."""
        return self._streaming(
            "StreamStdio",
            self._stdio.StreamStdio,
            empty_pb2.Empty(),
            None,
            default=False,
            check_available=False,
        )

    async def served_services(self, *, timeout: float = 5.0) -> frozenset[str] | None:
        """The pluginv2 services the plugin registered, from gRPC reflection.

        None when the plugin does not serve reflection; callers then learn from
        ``UNIMPLEMENTED`` answers instead.
        """
        stub = reflection_pb2_grpc.ServerReflectionStub(self._channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield request

        method = "ServerReflectionInfo"
        with self._translated(method):
            call = stub.ServerReflectionInfo(requests(), timeout=timeout)
            try:
                async for response in call:
                    names = {s.name for s in response.list_services_response.service}
                    return frozenset(n for n in names if n.startswith("pluginv2."))
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
            finally:
                call.cancel()
        return None

    # -- plumbing --------------------------------------------------------------------------

    def _check_available(self) -> None:
        if self._unavailable is not None:
            error = self._unavailable()
            if error is not None:
                raise error

    def _closed(self, method: str) -> PluginUnavailable:
        return PluginUnavailable(
            self.plugin_id,
            f"{method}: the connection to the plugin is closed (it was restarted or stopped)",
        )

    @contextlib.contextmanager
    def _translated(self, method: str) -> Iterator[None]:
        """gRPC failures as the host's error tree, for every shape of call."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, plugin_id=self.plugin_id, method=method) from None
        except grpc.aio.UsageError:
            raise self._closed(method) from None
        except asyncio.CancelledError:
            if self._caller_cancelled():
                raise
            raise self._closed(method) from None

    @staticmethod
    def _caller_cancelled() -> bool:
        """Whether a CancelledError out of grpc is our caller's own cancellation.

        Closing a channel also cancels its calls; a caller whose task nobody cancelled must
        see that as the plugin going away, not as a cancellation it never asked for.
        """
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def _unary(
        self,
        method: str,
        rpc: Callable[..., Awaitable[T]],
        request: object,
        timeout: float | None,
        *,
        check_available: bool = True,
    ) -> T:
        if check_available:
            self._check_available()
        with self._translated(method):
            return await rpc(request, timeout=self.default_timeout if timeout is None else timeout)

    async def _streaming(
        self,
        method: str,
        rpc: Callable[..., Any],
        request: object,
        timeout: float | None,
        *,
        default: bool = True,
        check_available: bool = True,
    ) -> AsyncIterator[Any]:
        if check_available:
            self._check_available()
        if timeout is None and default:
            timeout = self.default_timeout
        with self._translated(method):
            call = rpc(request, timeout=timeout)
            try:
                async for message in call:
                    yield message
            finally:
                call.cancel()
