"""The plugin host's exception tree.

Every error raised by ``plugin_host`` carries the id of the plugin it concerns::

    PluginError
    ├── PluginLaunchError            the process could not be started or connected
    │   │                            (carries exit_code and stderr_tail when known)
    │   ├── PluginSpawnError         exec failed (missing file, permission, bad format)
    │   └── HandshakeError           the go-plugin handshake failed (or stdout closed early)
    │       ├── PluginExitedBeforeHandshake   (the process ended first)
    │       ├── HandshakeTimeout              (no line within the start timeout)
    │       ├── MalformedHandshake            (garbage on stdout, quoted)
    │       ├── UnsupportedProtocol           (netrpc, unknown network)
    │       └── IncompatibleVersion           (core or app protocol version)
    ├── PluginUnavailable            not running, backing off, crash-looping, unreachable
    ├── PluginCallError              a call reached the plugin and failed
    │   ├── PluginTimeout            the deadline passed
    │   ├── NotImplementedByPlugin   the plugin does not serve this rpc
    │   ├── MessageTooLarge          RESOURCE_EXHAUSTED: a message exceeded a size limit
    │   └── PluginInternalError      the plugin answered with an error (carries errorSource)
    └── PluginNotFound               no plugin with that id is known

The HTTP layer maps this tree to Kubernetes ``Status`` bodies in exactly one place. Messages
are one line and never quote what a plugin wrote on stderr: that stays in ``stderr_tail``,
the logs and ``PluginStatus.last_output``, which are for operators only.
"""

from __future__ import annotations

import signal
from enum import StrEnum


class ErrorSource(StrEnum):
    """Who is to blame for a failed call, as the Grafana SDK marks it."""

    PLUGIN = "plugin"
    DOWNSTREAM = "downstream"
    UNKNOWN = ""


class PluginError(Exception):
    """Base class: something went wrong with a plugin."""

    def __init__(self, plugin_id: str, message: str) -> None:
        super().__init__(message)
        self.plugin_id = plugin_id
        self.message = message

    def __str__(self) -> str:
        return f"plugin {self.plugin_id}: {self.message}"


class PluginNotFound(PluginError):
    """No plugin with this id is registered with the host."""

    def __init__(self, plugin_id: str) -> None:
        super().__init__(plugin_id, "no such plugin is installed")


class PluginLaunchError(PluginError):
    """The plugin process could not be started and connected to.

    ``exit_code`` is the process's exit status when it ended on its own (negative: killed by
    that signal); ``stderr_tail`` holds its last lines on stderr. Both are for logs and
    operators: the message itself is one line and never quotes the plugin's output.
    """

    def __init__(
        self,
        plugin_id: str,
        message: str,
        *,
        exit_code: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(plugin_id, message)
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class PluginSpawnError(PluginLaunchError):
    """The operating system refused to execute the plugin binary."""


class HandshakeError(PluginLaunchError):
    """The go-plugin handshake did not complete."""


class PluginExitedBeforeHandshake(HandshakeError):
    """The process ended before printing its handshake line."""

    def __init__(self, plugin_id: str, *, exit_code: int | None, stderr_tail: str) -> None:
        what = describe_exit(exit_code) if exit_code is not None else "ended"
        quiet = "" if stderr_tail else " (it wrote nothing on stderr)"
        super().__init__(
            plugin_id,
            f"process {what} before the handshake{quiet}",
            exit_code=exit_code,
            stderr_tail=stderr_tail,
        )


class HandshakeTimeout(HandshakeError):
    """No handshake line arrived within the start timeout."""

    def __init__(self, plugin_id: str, *, timeout: float, stderr_tail: str = "") -> None:
        super().__init__(
            plugin_id,
            f"no handshake line on stdout within {timeout:g}s; the process was killed "
            "(is it a go-plugin binary, and is start_timeout long enough?)",
            stderr_tail=stderr_tail,
        )
        self.timeout = timeout


class MalformedHandshake(HandshakeError):
    """The first line on stdout is not a go-plugin handshake."""

    def __init__(self, plugin_id: str, *, line: str, why: str) -> None:
        shown = line if len(line) <= 200 else line[:200] + "…"
        super().__init__(plugin_id, f"unrecognized handshake line {shown!r}: {why}")
        self.line = line


class UnsupportedProtocol(HandshakeError):
    """The plugin speaks something other than gRPC over unix or tcp."""


class IncompatibleVersion(HandshakeError):
    """The plugin's core or app protocol version is not one the host speaks."""


class PluginUnavailable(PluginError):
    """The plugin cannot take calls now (stopped, restarting, crash-looping, unreachable)."""

    def __init__(self, plugin_id: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(plugin_id, message)
        self.retry_after = retry_after


class PluginCallError(PluginError):
    """A call reached the plugin and did not succeed."""

    def __init__(self, plugin_id: str, message: str, *, method: str) -> None:
        super().__init__(plugin_id, message)
        self.method = method


class PluginTimeout(PluginCallError):
    """The call's deadline passed before the plugin answered."""


class NotImplementedByPlugin(PluginCallError):
    """The plugin does not serve this rpc."""


class MessageTooLarge(PluginCallError):
    """A request or response exceeded a gRPC message size limit."""


class PluginInternalError(PluginCallError):
    """The plugin answered the call with an error."""

    def __init__(
        self,
        plugin_id: str,
        message: str,
        *,
        method: str,
        grpc_code: str,
        error_source: ErrorSource = ErrorSource.UNKNOWN,
    ) -> None:
        super().__init__(plugin_id, message, method=method)
        self.grpc_code = grpc_code
        self.error_source = error_source


def describe_exit(code: int) -> str:
    """How a process ended, in words: ``exited with status 3``, ``was killed by SIGKILL``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"
