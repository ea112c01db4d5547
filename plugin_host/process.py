"""A plugin process: spawn, handshake, drain its pipes for life, stop it, reap it.

How the child learns to die with the host (see docs/lifecycle.md): with util-linux's
``setpriv --pdeathsig KILL --`` in front of the plugin's argv when ``setpriv`` is installed
(it sets the signal and execs the plugin in place, same pid); otherwise with a ``preexec_fn``
calling ``prctl(PR_SET_PDEATHSIG)``. A ``preexec_fn`` makes Python fork() instead of vfork(),
which runs gRPC's fork handlers in the child; with a live channel in the host those can abort
the child before it execs (grpc/grpc#43055), so that fallback also turns gRPC's fork support
off (``GRPC_ENABLE_FORK_SUPPORT=false``, which only counts if set before gRPC is imported).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import pwd
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil

from plugin_host.errors import (
    HandshakeError,
    HandshakeTimeout,
    PluginExitedBeforeHandshake,
    PluginLaunchError,
    PluginSpawnError,
)
from plugin_host.handshake import HandshakeInfo, confine_environment, parse_handshake
from plugin_host.logs import LineSplitter, PluginLogParser, TailBuffer

log = logging.getLogger(__name__)

_LINUX = sys.platform.startswith("linux")
_PR_SET_PDEATHSIG = 1

# Looked up once, here: a forked child must not call dlsym (it may take locks another thread
# of the host held at fork time).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if _LINUX else None

_SETPRIV = shutil.which("setpriv") if _LINUX else None
PARENT_DEATH_SIGNAL_VIA = "setpriv" if _SETPRIV else ("preexec_fn" if _LINUX else "none")
"""How plugins get their parent-death signal here: ``setpriv``, ``preexec_fn`` or ``none``."""

_grpc_fork_support_off = True
if PARENT_DEATH_SIGNAL_VIA == "preexec_fn":
    # Only counts if gRPC is not imported yet (or was told already): say so at first spawn.
    _already_set = "GRPC_ENABLE_FORK_SUPPORT" in os.environ
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    _grpc_fork_support_off = os.environ["GRPC_ENABLE_FORK_SUPPORT"].lower() in (
        "0",
        "false",
        "no",
    ) and ("grpc" not in sys.modules or _already_set)


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged user plugin processes run as (``plugins.run_as_user``)."""

    user: str
    uid: int
    gid: int
    home: str = "/"


def resolve_run_as(user: str) -> RunAs:
    """``user`` as a :class:`RunAs`, or a ValueError saying why plugins cannot run as it.

    Only root can start processes as another user; running as root, util-linux's ``setpriv``
    switches to the user (``--reuid/--regid/--init-groups``) before it execs the plugin.
    """
    if not _LINUX or _SETPRIV is None:
        raise ValueError("running plugins as another user needs Linux and setpriv (util-linux)")
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ValueError(f"no such user {user!r}") from None
    if entry.pw_uid == 0:
        raise ValueError(f"user {user!r} is root; name an unprivileged user")
    # setpriv --init-groups gives the plugin the user's groups: none may be root's group.
    if entry.pw_gid == 0 or 0 in os.getgrouplist(entry.pw_name, entry.pw_gid):
        raise ValueError(
            f"user {user!r} is in the root group (gid 0), which would let plugins read and "
            "write what root's group can; name a user outside it"
        )
    if os.geteuid() != 0:
        raise ValueError(
            f"the bridge runs as uid {os.geteuid()}, not root, so it cannot start plugins as "
            f"{user!r}; unset plugins.run_as_user or start the bridge as root"
        )
    return RunAs(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir or "/")


def _give_workdir(workdir: Path, run_as: RunAs) -> None:
    """Hand the plugin's private directory to its user; its parent only needs to be passable."""
    os.chown(workdir, run_as.uid, run_as.gid)
    parent = workdir.parent.stat().st_mode
    if parent & 0o001 == 0:
        os.chmod(workdir.parent, stat.S_IMODE(parent) | 0o011)  # noqa: S103 - search only, no read or write


def _user_environment(env: dict[str, str], run_as: RunAs | None) -> dict[str, str]:
    """``env``, with HOME, USER and LOGNAME naming the plugin's user when it runs as one."""
    if run_as is None:
        return env
    return {**env, "HOME": run_as.home, "USER": run_as.user, "LOGNAME": run_as.user}


# setpriv reports a failed exec on stderr and exits with these (util-linux's EX_EXEC_*).
_SETPRIV_EXEC_FAILED = (126, 127)
_SETPRIV_EXEC_MESSAGE = "setpriv: failed to execute "

# Time allowed for a dead plugin's pipes to reach EOF (a process it started may hold them).
PIPE_DRAIN_TIMEOUT = 2.0
# Time allowed for the kernel to reap a process after SIGKILL before we stop waiting.
REAP_TIMEOUT = 10.0

SOCKET_ROOT_PREFIX = "gfbridge-"
_OWNER_FILE = "owner"

_ELF_MAGIC = b"\x7fELF"
# ELF machines that a host of the first kind also runs (32-bit builds on 64-bit kernels).
_ELF_COMPATIBLE = {62: {3}, 183: {40}}


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """The ``preexec_fn`` fallback: SIGKILL the child when the host dies, however it dies.

    The death signal survives exec. If the host died between fork and prctl the signal would
    never come, so the child checks its parent and bows out itself.
    """

    def setup() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


# -- socket roots ---------------------------------------------------------------------------


def make_socket_root(base: Path | None = None) -> Path:
    """A private (0700) directory for plugin sockets, short enough for the 108-byte limit.

    It holds a file naming its owner (this process), so a later host can remove the roots of
    hosts that died without cleaning up (:func:`sweep_stale_socket_roots`), which it does here
    before making its own.
    """
    if base is None:
        base = Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())  # noqa: S108 - private 0700 dir below
    sweep_stale_socket_roots(base)
    root = Path(tempfile.mkdtemp(prefix=SOCKET_ROOT_PREFIX, dir=base))
    me = psutil.Process()
    (root / _OWNER_FILE).write_text(f"{me.pid} {me.create_time()!r}\n", encoding="ascii")
    return root


def sweep_stale_socket_roots(base: Path) -> list[Path]:
    """Remove socket roots under ``base`` whose owning host is gone; return what was removed.

    Only directories of this user whose owner file names a process that no longer exists
    (pid and start time) are touched; roots without an owner file are left alone.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SOCKET_ROOT_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        owner = _read_owner(Path(entry.path) / _OWNER_FILE)
        if owner is None or _owner_alive(*owner):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
        log.info("removed the socket directory %s of a host that is gone", entry.path)
    return removed


def _read_owner(path: Path) -> tuple[int, float] | None:
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        pid, started = path.read_text(encoding="ascii").split()
        return int(pid), float(started)
    except (OSError, ValueError):
        return None


def _owner_alive(pid: int, started: float) -> bool:
    try:
        # The start time tells the owner from a later process that got the same pid.
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


# -- the process ----------------------------------------------------------------------------


class _PluginPipes(asyncio.SubprocessProtocol):
    """Everything the child sends, as it arrives: the handshake line, log lines, EOF, exit.

    Data is handled in the loop's callback, so reading never pauses and a pipe never fills.
    """

    def __init__(self, plugin_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.exited: asyncio.Future[int] = loop.create_future()
        self.handshake_line: asyncio.Future[bytes | None] = loop.create_future()
        self.eof: dict[int, asyncio.Future[None]] = {fd: loop.create_future() for fd in (1, 2)}
        self.stderr_tail = TailBuffer()
        self._lines = {1: LineSplitter(), 2: LineSplitter()}
        self._logs = {1: PluginLogParser(plugin_id), 2: PluginLogParser(plugin_id)}
        self._transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        splitter = self._lines.get(fd)
        if splitter is not None:
            for line in splitter.feed(data):
                self._line(fd, line)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        splitter = self._lines.get(fd)
        if splitter is None:
            return
        for line in splitter.flush():
            self._line(fd, line)
        if fd == 1 and not self.handshake_line.done():
            self.handshake_line.set_result(None)
        if not self.eof[fd].done():
            self.eof[fd].set_result(None)

    def process_exited(self) -> None:
        assert self._transport is not None
        code = self._transport.get_returncode()
        if code is not None and not self.exited.done():
            self.exited.set_result(code)

    def _line(self, fd: int, line: bytes) -> None:
        if fd == 1 and not self.handshake_line.done():
            # The first line on stdout is the handshake; go-plugin discards the rest, we log it.
            self.handshake_line.set_result(line)
            return
        if fd == 2:
            self.stderr_tail.add(line)
        self._logs[fd].feed(line)


class PluginProcess:
    """One started plugin binary, from spawn to reaped; see :meth:`start`."""

    def __init__(
        self,
        *,
        plugin_id: str,
        transport: asyncio.SubprocessTransport,
        pipes: _PluginPipes,
        workdir: Path,
    ) -> None:
        self.plugin_id = plugin_id
        self._transport = transport
        self._pipes = pipes
        self._workdir = workdir
        self._handshake: HandshakeInfo | None = None
        self._kill_reason: str | None = None
        self._finished = False

    @property
    def pid(self) -> int:
        return self._transport.get_pid()

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    @property
    def handshake(self) -> HandshakeInfo:
        if self._handshake is None:
            raise RuntimeError("the plugin has not completed the handshake")
        return self._handshake

    @property
    def stderr_tail(self) -> str:
        """The plugin's last lines on stderr (for operators and logs, not for API callers)."""
        return self._pipes.stderr_tail.text()

    @property
    def kill_reason(self) -> str | None:
        """Why the host killed this process, if it did so while it was running."""
        return self._kill_reason

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
        run_as: RunAs | None = None,
    ) -> PluginProcess:
        """Spawn the binary and wait for its handshake.

        ``workdir`` is the plugin's private ``TMPDIR`` and ``PLUGIN_UNIX_SOCKET_DIR`` (its
        socket is created there); it is created here if needed and removed when the process
        is stopped or fails to start. A failed start leaves no process behind.
        """
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)  # noqa: ASYNC240 - tmpfs, microseconds
        try:
            if run_as is not None:
                _give_workdir(workdir, run_as)
            process = await cls._spawn(
                plugin_id, executable, args=args, env=env, workdir=workdir, cwd=cwd, run_as=run_as
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            process._handshake = await process._await_handshake(
                executable, start_timeout=start_timeout
            )
        except BaseException as exc:
            if isinstance(exc, PluginLaunchError):
                exc.stderr_tail = exc.stderr_tail or process.stderr_tail
            await process.stop(grace=0.0)
            raise
        log.debug(
            "plugin %s started (pid %d) at %s", plugin_id, process.pid, process.handshake.address
        )
        return process

    @classmethod
    async def _spawn(
        cls,
        plugin_id: str,
        executable: Path,
        *,
        args: tuple[str, ...],
        env: Mapping[str, str],
        workdir: Path,
        cwd: Path | None,
        run_as: RunAs | None = None,
    ) -> PluginProcess:
        _check_executable(plugin_id, executable)
        loop = asyncio.get_running_loop()
        pipes = _PluginPipes(plugin_id, loop)
        argv = [str(executable), *args]
        preexec: Callable[[], None] | None = None
        if run_as is not None:
            if _SETPRIV is None:
                raise PluginSpawnError(plugin_id, "plugins.run_as_user needs setpriv (util-linux)")
            # Numeric ids (no name lookup can be steered), the user's own groups and none of
            # ours, and no_new_privs: a setuid binary the plugin runs cannot regain root.
            switch = [f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--init-groups"]
            argv = [_SETPRIV, *switch, "--no-new-privs", "--pdeathsig", "KILL", "--", *argv]
        elif _SETPRIV is not None:
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        elif _prctl is not None:
            _warn_about_fork_support()
            preexec = _die_with_parent(os.getpid())
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: pipes,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_user_environment(confine_environment(env, private_dir=str(workdir)), run_as),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except OSError as exc:
            raise PluginSpawnError(
                plugin_id, f"cannot execute {executable}: {_strerror(exc)}"
            ) from exc
        except (ValueError, TypeError) as exc:
            # subprocess refuses e.g. "=" in a variable name or a NUL byte in a value.
            raise PluginSpawnError(
                plugin_id, f"cannot execute {executable}: invalid environment or arguments ({exc})"
            ) from exc
        return cls(plugin_id=plugin_id, transport=transport, pipes=pipes, workdir=workdir)

    async def _await_handshake(self, executable: Path, *, start_timeout: float) -> HandshakeInfo:
        pipes = self._pipes
        first: set[asyncio.Future[Any]] = {pipes.handshake_line, pipes.exited}
        done, _ = await asyncio.wait(
            first,
            timeout=start_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not done:
            raise HandshakeTimeout(self.plugin_id, timeout=start_timeout)
        if not pipes.handshake_line.done():
            # It exited; the pipe may still hold what it wrote. A process it started may hold
            # the pipe open, so do not wait for EOF for long.
            await asyncio.wait({pipes.handshake_line}, timeout=1.0)
        line = pipes.handshake_line.result() if pipes.handshake_line.done() else None
        if line is not None:
            text = line.decode("utf-8", "backslashreplace")
            return parse_handshake(text, plugin_id=self.plugin_id)
        if self.returncode is None:
            await asyncio.wait({pipes.exited}, timeout=1.0)
        # Let stderr finish so the tail holds the plugin's last words.
        await asyncio.wait({pipes.eof[2]}, timeout=1.0)
        code = self.returncode
        tail = self.stderr_tail
        if code is None:
            raise HandshakeError(
                self.plugin_id,
                "closed its stdout without printing the handshake line (it is still running)",
                stderr_tail=tail,
            )
        spawn_error = _setpriv_exec_error(code, tail)
        if spawn_error is not None:
            raise PluginSpawnError(
                self.plugin_id,
                f"cannot execute {executable}: {spawn_error}",
                exit_code=code,
                stderr_tail=tail,
            )
        raise PluginExitedBeforeHandshake(self.plugin_id, exit_code=code, stderr_tail=tail)

    async def wait(self) -> int:
        """Wait for the process to exit and return its status (negative: killed by a signal).

        Returns as soon as the process is gone, whoever still holds its pipes.
        """
        return await asyncio.shield(self._pipes.exited)

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL the plugin and everything in its process group, at once.

        ``reason`` is remembered (see :attr:`kill_reason`) if the process was still running
        and no earlier reason was given. Safe to call at any time, also after exit: what the
        plugin started may outlive it and is killed too.
        """
        if reason is not None and self._kill_reason is None and self.returncode is None:
            self._kill_reason = reason
        self._signal_group(signal.SIGKILL)

    async def quit_then_kill(self, reason: str, *, wait: float = 1.0) -> None:
        """Send SIGQUIT, allow ``wait`` seconds, then :meth:`kill`.

        For a hung plugin: the Go runtime answers SIGQUIT by writing every goroutine's stack
        to stderr, which then shows in the plugin's log and ``stderr_tail``.
        """
        if self.returncode is None and self._kill_reason is None:
            self._kill_reason = reason
        if self.returncode is None and not self._finished:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGQUIT)
            await asyncio.wait({self._pipes.exited}, timeout=wait)
        self.kill(reason)

    async def stop(
        self,
        *,
        grace: float = 2.0,
        request_shutdown: Callable[[], Awaitable[object]] | None = None,
    ) -> int | None:
        """Stop the plugin and release everything it held; return its exit status.

        With ``request_shutdown`` (go-plugin's ``Shutdown`` call), the plugin gets ``grace``
        seconds to exit by itself. Then its process group is SIGKILLed (always: a process it
        started may outlive it), the process is reaped, its pipes are given a moment to reach
        EOF and closed, and its socket and private directory are removed.

        Idempotent. If cancelled, the plugin is still killed at once and the rest happens as
        soon as it has exited. Returns None only if the process has not gone away
        ``REAP_TIMEOUT`` seconds after SIGKILL (stuck in the kernel).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            if self.returncode is None and request_shutdown is not None and not self._finished:
                # go-plugin 1.0.x answers UNAVAILABLE because it stops before replying: any
                # outcome of the call is fine, what counts is whether the process exits.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(max(0.05, grace)):
                        await request_shutdown()
                remaining = max(0.0, deadline - loop.time())
                await asyncio.wait({self._pipes.exited}, timeout=remaining)
                if self.returncode is None:
                    log.warning(
                        "plugin %s (pid %d) did not exit within %gs of the shutdown request; "
                        "killing it",
                        self.plugin_id,
                        self.pid,
                        grace,
                    )
            self._signal_group(signal.SIGKILL)
            await self._reap()
        finally:
            if self.returncode is None:
                self._signal_group(signal.SIGKILL)
                self._pipes.exited.add_done_callback(lambda _: self._finish())
            else:
                self._finish()
        return self.returncode

    async def _reap(self) -> None:
        pipes = self._pipes
        if self.returncode is None:
            await asyncio.wait({pipes.exited}, timeout=REAP_TIMEOUT)
            if self.returncode is None:
                log.error(
                    "plugin %s (pid %d) has not exited %gs after SIGKILL; giving up waiting",
                    self.plugin_id,
                    self.pid,
                    REAP_TIMEOUT,
                )
                return
        _, open_pipes = await asyncio.wait(pipes.eof.values(), timeout=PIPE_DRAIN_TIMEOUT)
        if open_pipes:
            log.debug(
                "plugin %s: a process that escaped its process group still holds its output "
                "pipes; closing them",
                self.plugin_id,
            )

    def _signal_group(self, signum: int) -> None:
        # Once the transport is closed the pid may belong to someone else.
        if self._finished:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._transport.close()
        # The socket lives in the private directory (TMPDIR and PLUGIN_UNIX_SOCKET_DIR point
        # there), so removing the directory removes it. A path the plugin announced elsewhere
        # is not ours to delete.
        shutil.rmtree(self._workdir, ignore_errors=True)


def _warn_about_fork_support() -> None:
    global _grpc_fork_support_off  # noqa: PLW0603 - warn once per process
    if _grpc_fork_support_off:
        return
    _grpc_fork_support_off = True
    log.warning(
        "setpriv is not installed and gRPC was imported before plugin_host with fork support "
        "on: set GRPC_ENABLE_FORK_SUPPORT=false in the environment, or plugin processes may "
        "abort while starting (grpc/grpc#43055)"
    )


def _check_executable(plugin_id: str, executable: Path) -> None:
    """Fail as exec would, before spawning, so errors read the same with or without setpriv.

    (setpriv runs the plugin with execvp, which would hand a binary for another machine to
    /bin/sh instead of failing with ENOEXEC.)
    """
    if os.sep not in str(executable):
        return  # looked up in PATH by exec; let it report
    try:
        info = executable.stat()
        if stat.S_ISDIR(info.st_mode) or not os.access(executable, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise PluginSpawnError(plugin_id, f"cannot execute {executable}: {_strerror(exc)}") from exc
    try:
        with executable.open("rb") as file:
            head = file.read(20)
    except OSError:
        return  # execute-only binaries exist; exec will tell
    if not head.startswith((b"#!", _ELF_MAGIC)) or _foreign_elf(head):
        error = OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC))
        raise PluginSpawnError(plugin_id, f"cannot execute {executable}: {_strerror(error)}")


def _foreign_elf(head: bytes) -> bool:
    """True for an ELF header whose machine this host cannot run."""
    machine = _elf_machine(head)
    mine = _own_elf_machine()
    if machine is None or mine is None:
        return False
    return machine != mine and machine not in _ELF_COMPATIBLE.get(mine, set())


def _elf_machine(head: bytes) -> int | None:
    if not head.startswith(_ELF_MAGIC) or len(head) < 20:
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


_own_machine: list[int | None] = []


def _own_elf_machine() -> int | None:
    if not _own_machine:
        try:
            with open(os.path.realpath(sys.executable), "rb") as file:
                _own_machine.append(_elf_machine(file.read(20)))
        except OSError:
            _own_machine.append(None)
    return _own_machine[0]


def _strerror(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.errno == errno.ENOEXEC:
        text += " (not a program for this system: built for another OS or architecture?)"
    return text


def _setpriv_exec_error(code: int, tail: str) -> str | None:
    """setpriv's own complaint when it could not exec the plugin, as an strerror text."""
    if _SETPRIV is None or code not in _SETPRIV_EXEC_FAILED:
        return None
    for line in reversed(tail.splitlines()):
        if line.startswith(_SETPRIV_EXEC_MESSAGE):
            return line.rpartition(": ")[2]
    return None
