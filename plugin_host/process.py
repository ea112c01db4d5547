"""A plugin process: spawn, handshake, drain its pipes for life, stop it, reap it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from plugin_host.errors import (
    HandshakeError,
    HandshakeTimeout,
    PluginExitedBeforeHandshake,
    PluginSpawnError,
)
from plugin_host.handshake import HandshakeInfo, Network, parse_handshake
from plugin_host.logs import PluginLogParser, TailBuffer, iter_lines

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """Runs in the forked child before exec: SIGKILL it when the host dies, however it dies.

    The death signal survives exec. If the host died between fork and prctl the signal would
    never come, so the child checks its parent and bows out itself.
    """

    def setup() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


def make_socket_root() -> Path:
    """A private directory for plugin sockets, short enough for the 108-byte path limit."""
    base = "/tmp" if os.path.isdir("/tmp") else None  # noqa: S108 - private 0700 dir below
    return Path(tempfile.mkdtemp(prefix="gfbridge-", dir=base))


class PluginProcess:
    """One started plugin binary that has completed the go-plugin handshake."""

    def __init__(
        self,
        *,
        plugin_id: str,
        proc: asyncio.subprocess.Process,
        workdir: Path,
        handshake: HandshakeInfo,
        readers: list[asyncio.Task[None]],
        stderr_tail: TailBuffer,
    ) -> None:
        self.plugin_id = plugin_id
        self.handshake = handshake
        self._proc = proc
        self._workdir = workdir
        self._readers = readers
        self._stderr_tail = stderr_tail
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.text()

    @classmethod
    async def start(
        cls,
        *,
        plugin_id: str,
        executable: Path,
        env: Mapping[str, str],
        workdir: Path,
        start_timeout: float = 60.0,
        args: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> PluginProcess:
        """Spawn the binary and wait for its handshake.

        ``workdir`` is the plugin's private ``TMPDIR`` (its socket is created there); it is
        created here and removed when the process is stopped or fails to start.
        """
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)  # noqa: ASYNC240 - tmpfs, microseconds
        env = {**env, "TMPDIR": str(workdir)}
        try:
            proc = await asyncio.create_subprocess_exec(
                str(executable),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise PluginSpawnError(
                plugin_id, f"cannot execute {executable}: {exc.strerror or exc}"
            ) from exc

        assert proc.stdout is not None and proc.stderr is not None
        parser = PluginLogParser(plugin_id)
        tail = TailBuffer()
        first_line: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        readers = [
            asyncio.create_task(
                _read_stdout(proc.stdout, parser, first_line), name=f"{plugin_id}-stdout"
            ),
            asyncio.create_task(
                _read_stderr(proc.stderr, parser, tail), name=f"{plugin_id}-stderr"
            ),
        ]
        try:
            handshake = await _await_handshake(
                plugin_id, proc, first_line, tail, readers, start_timeout=start_timeout
            )
        except BaseException:
            await _kill_and_reap(proc, readers)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        log.debug("plugin %s started (pid %d) at %s", plugin_id, proc.pid, handshake.address)
        return cls(
            plugin_id=plugin_id,
            proc=proc,
            workdir=workdir,
            handshake=handshake,
            readers=readers,
            stderr_tail=tail,
        )

    async def wait(self) -> int:
        """Wait for the process to exit and return its exit status (negative: signal)."""
        return await self._proc.wait()

    def kill(self) -> None:
        """SIGKILL the plugin and anything it started (it leads its own process group)."""
        if self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    def signal(self, signum: int) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)

    async def stop(
        self,
        *,
        grace: float = 2.0,
        request_shutdown: Callable[[], Awaitable[object]] | None = None,
    ) -> int:
        """Ask the plugin to shut down, wait ``grace`` seconds, then SIGKILL; always reap.

        Idempotent. Removes the plugin's socket and private directory afterwards.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._proc.returncode is None and request_shutdown is not None:
            # go-plugin 1.0.x answers UNAVAILABLE because it stops before replying: any outcome
            # of the call is fine, what counts is whether the process exits.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(request_shutdown(), timeout=max(0.05, grace))
        if self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._proc.wait(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.warning(
                    "plugin %s (pid %d) did not exit within %.1fs of shutdown; killing it",
                    self.plugin_id,
                    self._proc.pid,
                    grace,
                )
                self.kill()
        await _kill_and_reap(self._proc, self._readers)
        if not self._stopped:
            self._stopped = True
            self._cleanup()
        assert self._proc.returncode is not None
        return self._proc.returncode

    def _cleanup(self) -> None:
        if self.handshake.network is Network.UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.handshake.address)
        shutil.rmtree(self._workdir, ignore_errors=True)


async def _await_handshake(
    plugin_id: str,
    proc: asyncio.subprocess.Process,
    first_line: asyncio.Future[bytes | None],
    tail: TailBuffer,
    readers: list[asyncio.Task[None]],
    *,
    start_timeout: float,
) -> HandshakeInfo:
    exited: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
    waiting: set[asyncio.Future[Any]] = {first_line, exited}
    try:
        done, _ = await asyncio.wait(
            waiting, timeout=start_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            raise HandshakeTimeout(plugin_id, timeout=start_timeout)
        if not first_line.done():
            # The process is gone; give the pipe a moment to hand over what it already holds.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(first_line), timeout=1.0)
        line = first_line.result() if first_line.done() else None
        if line is None:
            if proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=1.0)
            # Let the stderr reader finish so the tail holds the plugin's last words.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(readers[1]), timeout=1.0)
            raise PluginExitedBeforeHandshake(
                plugin_id, exit_code=proc.returncode, stderr_tail=tail.text()
            )
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", "backslashreplace")
        return parse_handshake(text, plugin_id=plugin_id)
    except HandshakeError:
        raise
    finally:
        exited.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await exited


async def _read_stdout(
    stream: asyncio.StreamReader, parser: PluginLogParser, first_line: asyncio.Future[bytes | None]
) -> None:
    """The first line is the handshake; everything after it is logged (go-plugin drops it)."""
    try:
        async for line in iter_lines(stream):
            if not first_line.done():
                first_line.set_result(line)
                continue
            parser.feed(line)
    finally:
        if not first_line.done():
            first_line.set_result(None)


async def _read_stderr(
    stream: asyncio.StreamReader, parser: PluginLogParser, tail: TailBuffer
) -> None:
    async for line in iter_lines(stream):
        tail.add(line)
        parser.feed(line)


async def _kill_and_reap(
    proc: asyncio.subprocess.Process, readers: list[asyncio.Task[None]]
) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()
    # Pipes reach EOF once every writer is gone; a grandchild that kept them open must not
    # keep us waiting forever.
    _, pending = await asyncio.wait(readers, timeout=2.0)
    for task in pending:
        task.cancel()
    for task in readers:
        with contextlib.suppress(asyncio.CancelledError):
            await task
