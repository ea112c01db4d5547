"""A tiny go-plugin server for tests that need behaviours the fixture plugins do not have.

Run as a script (see :func:`tests.plugin_host.supervision.mini_plugin`). ``MINI_PLUGIN`` holds
comma-separated behaviours:

- ``health_hangs_after=N``: answer N health checks, then never answer one again;
- ``stdio_breaks_once``: fail the first GRPCStdio stream, then stream a few lines.

Like a Go plugin, it answers SIGQUIT with a goroutine dump on stderr and exit status 2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.plugin import grpc_stdio_pb2, grpc_stdio_pb2_grpc

GOROUTINE_DUMP = (
    b"SIGQUIT: quit\nPC=0x46b0e1 m=0 sigcode=0\n\n"
    b"goroutine 1 [select, 2 minutes]:\nmain.main()\n\t/src/main.go:42 +0x1d\n"
)
STDIO_LINES = (
    (grpc_stdio_pb2.StdioData.STDOUT, b"mini stdout one\n[WARN] mini stdout "),
    (grpc_stdio_pb2.StdioData.STDOUT, b"two\n"),
    (grpc_stdio_pb2.StdioData.STDERR, b'{"@level":"error","@message":"mini stderr"}\n'),
)


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, answers: int | None) -> None:
        self.answers = answers
        self.calls = 0

    async def Check(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.answers is not None and self.calls > self.answers:
            await asyncio.Event().wait()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class Stdio(grpc_stdio_pb2_grpc.GRPCStdioServicer):
    def __init__(self, *, breaks_once: bool) -> None:
        self.breaks_once = breaks_once
        self.calls = 0

    async def StreamStdio(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[grpc_stdio_pb2.StdioData]:
        self.calls += 1
        if self.breaks_once and self.calls == 1:
            await context.abort(grpc.StatusCode.INTERNAL, "stdio broke (mini plugin)")
        for channel, data in STDIO_LINES:
            yield grpc_stdio_pb2.StdioData(channel=channel, data=data)
        await asyncio.Event().wait()


def dump_and_exit() -> None:
    os.write(2, GOROUTINE_DUMP)
    os._exit(2)


async def main() -> None:
    behaviours = dict(
        item.partition("=")[::2] for item in os.environ.get("MINI_PLUGIN", "").split(",") if item
    )
    answers = behaviours.get("health_hangs_after")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Health(int(answers) if answers else None), server)
    grpc_stdio_pb2_grpc.add_GRPCStdioServicer_to_server(
        Stdio(breaks_once="stdio_breaks_once" in behaviours), server
    )
    # Where go-plugin puts its socket: PLUGIN_UNIX_SOCKET_DIR (>= 1.5), else TMPDIR.
    directory = os.environ.get("PLUGIN_UNIX_SOCKET_DIR") or os.environ["TMPDIR"]
    path = os.path.join(directory, "mini.sock")
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, dump_and_exit)
    sys.stdout.write(f"1|2|unix|{path}|grpc|\n")
    sys.stdout.flush()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
