"""Plugin-directory safety: no binary runs from a place someone else can write to.

Real files with real modes and owners, real discovery, the real ``grafana-bridge`` command,
and real plugin processes for ``plugins.run_as_user``. Changing owners (and running a
plugin as another user) needs root: those tests run only as root, and under ``CI=true`` a
non-root run reports them as failures rather than passing silently (tests/conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from bridge.cli import warn_if_root
from bridge.config import ConfigError, load_config
from plugin_host.discovery import DiscoveryResult, LoadErrorCode, discover
from plugin_host.host import HostConfig, PluginHost
from plugin_host.keyring import KeyRing
from plugin_host.platform import GoPlatform
from plugin_host.process import resolve_run_as
from plugin_host.supervisor import PluginState, SupervisorOptions
from protos.pluginv2 import backend_pb2 as pb
from tests.conftest import PY_FIXTURE_DIR

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="changing owners and users needs root")
PLUGIN_ID = "acme-safety-datasource"
EXECUTABLE = "gpx_safety_linux_amd64"
GRAFANA_BRIDGE = Path(sys.executable).with_name("grafana-bridge")


def make_plugin(plugins: Path, *, launch: Path | None = None) -> Path:
    """A backend plugin (unsigned) whose executable is a shell script; its directory."""
    directory = plugins / PLUGIN_ID
    directory.mkdir(parents=True)
    manifest = {
        "id": PLUGIN_ID,
        "type": "datasource",
        "name": "Safety",
        "backend": True,
        "executable": "gpx_safety",
        "info": {"version": "1.0.0"},
    }
    (directory / "plugin.json").write_text(json.dumps(manifest))
    body = f'exec "{launch}" "$@"\n' if launch is not None else "exit 0\n"
    (directory / EXECUTABLE).write_text("#!/bin/sh\n" + body)
    (directory / EXECUTABLE).chmod(0o755)
    return directory


def run(plugins: Path, *, strict: bool = True) -> DiscoveryResult:
    return discover(
        [plugins],
        keyring=KeyRing.load(),
        allow_unsigned=frozenset({PLUGIN_ID}),
        platform=GoPlatform(goos="linux", goarch="amd64"),
        strict_permissions=strict,
    )


def refused(result: DiscoveryResult, path: Path, fragment: str) -> None:
    assert result.get(PLUGIN_ID) is None
    assert len(result.errors) == 1, [str(e) for e in result.errors]
    error = result.errors[0]
    assert error.code is LoadErrorCode.UNSAFE_PERMISSIONS
    assert error.plugin_id == PLUGIN_ID
    assert error.path == path
    assert fragment in error.reason, error.reason
    assert "plugins.strict_permissions" in error.reason


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    # pytest's base temporary directory is 0700 and ours: a safe place to start from.
    directory = tmp_path / "plugins"
    directory.mkdir(mode=0o755)
    return directory


def test_safe_layout_loads(plugins: Path) -> None:
    make_plugin(plugins)
    result = run(plugins)
    assert result.errors == ()
    assert result.get(PLUGIN_ID) is not None


@pytest.mark.parametrize(
    ("what", "mode", "fragment"),
    [
        ("executable", 0o775, "writable by group"),
        ("executable", 0o757, "writable by others"),
        ("plugin directory", 0o777, "writable by group and others"),
        ("plugins directory", 0o770, "writable by group"),
        ("plugins directory", 0o1777, "writable by group and others"),  # sticky: not enough here
        ("other file", 0o666, "writable by group and others"),
        ("nested directory", 0o757, "writable by others"),
    ],
)
def test_writable_by_others_is_refused(plugins: Path, what: str, mode: int, fragment: str) -> None:
    directory = make_plugin(plugins)
    (directory / "lib").mkdir()
    (directory / "lib" / "helper.py").write_text("")
    path = {
        "executable": directory / EXECUTABLE,
        "plugin directory": directory,
        "plugins directory": plugins,
        "other file": directory / "lib" / "helper.py",
        "nested directory": directory / "lib",
    }[what]
    path.chmod(mode)
    refused(run(plugins), path, fragment)


def test_sticky_world_writable_directory_above_the_plugins_directory_is_allowed(
    tmp_path: Path,
) -> None:
    """As /tmp: in a sticky directory nobody can rename or replace what others own."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    plugins = shared / "plugins"
    plugins.mkdir(mode=0o755)
    make_plugin(plugins)
    assert run(plugins).errors == ()
    shared.chmod(0o777)  # without the sticky bit anyone could swap the plugins directory
    refused(run(plugins), shared, "writable by group and others")


def test_symlinked_plugin_is_checked_where_it_points(plugins: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    directory = make_plugin(elsewhere)
    (plugins / PLUGIN_ID).symlink_to(directory)
    assert run(plugins).errors == ()
    elsewhere.chmod(0o777)
    refused(run(plugins), elsewhere, "writable by group and others")


def test_the_plugins_directory_holding_a_symlinked_plugin_is_checked(
    plugins: Path, tmp_path: Path
) -> None:
    """Whoever can write the plugins directory can point the link somewhere else."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (plugins / PLUGIN_ID).symlink_to(make_plugin(elsewhere))
    plugins.chmod(0o777)
    refused(run(plugins), plugins, "writable by group and others")


def test_a_directory_too_large_to_check_is_refused(
    plugins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking stops at a bound, and what was not checked is not trusted (fail closed)."""
    import plugin_host.discovery as discovery  # noqa: PLC0415 - the bound is module state

    directory = make_plugin(plugins)
    for index in range(5):
        (directory / f"asset-{index}.js").write_text("")
    monkeypatch.setattr(discovery, "_MAX_CHECKED_ENTRIES", 4)
    refused(run(plugins), directory, "more than 4")
    monkeypatch.setattr(discovery, "_MAX_CHECKED_ENTRIES", 100)
    assert run(plugins).errors == ()


def test_escape_hatch_turns_the_check_off(plugins: Path) -> None:
    directory = make_plugin(plugins)
    directory.chmod(0o777)
    result = run(plugins, strict=False)
    assert result.errors == ()
    assert result.get(PLUGIN_ID) is not None


@needs_root
@pytest.mark.parametrize("what", ["executable", "plugin directory", "plugins directory"])
def test_owned_by_another_non_root_user_is_refused(plugins: Path, what: str) -> None:
    directory = make_plugin(plugins)
    path = {
        "executable": directory / EXECUTABLE,
        "plugin directory": directory,
        "plugins directory": plugins,
    }[what]
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    refused(run(plugins), path, f"owned by uid {nobody.pw_uid} (nobody)")


def test_plugins_check_command_shows_the_load_error(plugins: Path) -> None:
    directory = make_plugin(plugins)
    directory.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    args = [str(GRAFANA_BRIDGE), "plugins", "check", "--plugins", str(plugins)]
    args += ["--allow-unsigned", PLUGIN_ID, "--json"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    errors = json.loads(result.stdout)["errors"]
    assert [(e["id"], e["code"], e["path"]) for e in errors] == [
        (PLUGIN_ID, "unsafePermissions", str(directory))
    ]
    # The escape hatch, from the environment as an operator would set it.
    config = load_config(environ={"BRIDGE_PLUGINS__STRICT_PERMISSIONS": "false"})
    assert config.host_config().strict_permissions is False
    assert load_config(environ={}).host_config().strict_permissions is True


async def test_host_never_starts_a_refused_plugin(plugins: Path) -> None:
    directory = make_plugin(plugins, launch=PY_FIXTURE_DIR / "gpx_pyfixture_linux_amd64")
    directory.chmod(0o777)
    config = HostConfig(plugin_dirs=(plugins,), allow_unsigned=frozenset({PLUGIN_ID}))
    children = set(psutil.Process().children(recursive=True))
    async with PluginHost(config, host_env={}) as host:
        await host.start(wait=10)
        assert PLUGIN_ID not in host.registry
        assert [e.code for e in host.discovery.errors] == [LoadErrorCode.UNSAFE_PERMISSIONS]
        assert set(psutil.Process().children(recursive=True)) == children


# -- running as root ---------------------------------------------------------------------------


def test_root_warning(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(environ={})
    with caplog.at_level(logging.WARNING, logger="bridge"):
        warned = warn_if_root(config)
    assert warned is ROOT
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge"]
    if ROOT:
        assert len(messages) == 1
        assert "runs as root" in messages[0]
        assert "plugins.run_as_user" in messages[0]
    else:
        assert messages == []


def test_run_as_user_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"plugins.run_as_user": "no-such-user-here"})
    assert "plugins.run_as_user" in str(caught.value)
    assert "no such user 'no-such-user-here'" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"plugins.run_as_user": "root"})
    assert "is root; name an unprivileged user" in str(caught.value)


@pytest.mark.parametrize("where", ["primary", "supplementary"])
def test_run_as_user_in_the_root_group_is_refused(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """uid 0 is not the only way to root's files: gid 0 (or membership of group root) too."""
    gid = 0 if where == "primary" else 4242
    fake = pwd.struct_passwd(("svc", "x", 4242, gid, "", "/home/svc", "/bin/sh"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake)
    monkeypatch.setattr(os, "getgrouplist", lambda name, base: [base, 0])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ValueError, match=r"in the root group \(gid 0\)"):
        resolve_run_as("svc")
    monkeypatch.setattr(os, "getgrouplist", lambda name, base: [base])
    if where == "supplementary":
        assert resolve_run_as("svc").gid == 4242


REFUSAL_SCRIPT = """
import sys
from bridge.config import ConfigError, load_config
try:
    load_config(environ={}, overrides={"plugins.run_as_user": "nobody"})
except ConfigError as exc:
    print(exc)
    sys.exit(3)
sys.exit(0)
"""


def test_run_as_user_is_refused_when_the_bridge_is_not_root() -> None:
    """The refusal as a non-root bridge sees it: run directly, or as nobody when we are root."""
    argv = [sys.executable, "-c", REFUSAL_SCRIPT]
    if ROOT:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to test as another user"
        nobody = pwd.getpwnam("nobody")
        argv = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        argv += [sys.executable, "-c", REFUSAL_SCRIPT]
    cwd = Path(__file__).resolve().parents[2]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=60, check=False
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "plugins.run_as_user" in result.stdout
    assert "not root, so it cannot start plugins as 'nobody'" in result.stdout


@needs_root
@pytest.mark.go
async def test_run_as_user_runs_plugins_as_that_user(
    tmp_path: Path, go_fixture_binary: Path
) -> None:
    """The Go fixture (one static binary, readable by anyone) started as ``nobody``."""
    # pytest's temporary directories are 0700: the plugin user could not reach the plugin.
    base = Path(tempfile.mkdtemp(prefix="run-as-"))
    base.chmod(0o755)
    try:
        await run_go_fixture_as_nobody(base, go_fixture_binary)
    finally:
        shutil.rmtree(base)


async def run_go_fixture_as_nobody(base: Path, go_fixture_binary: Path) -> None:
    plugins = base / "plugins"
    plugins.mkdir(mode=0o755)
    make_plugin(plugins, launch=go_fixture_binary)
    nobody = pwd.getpwnam("nobody")
    config = HostConfig(
        plugin_dirs=(plugins,),
        allow_unsigned=frozenset({PLUGIN_ID}),
        supervisor=SupervisorOptions(
            start_timeout=15, stop_grace=1, run_as=resolve_run_as("nobody")
        ),
    )
    host_env = {"PATH": os.environ.get("PATH", ""), "HOME": "/root", "USER": "root"}
    async with PluginHost(config, host_env=host_env) as host:
        (status,) = await host.start(wait=20)
        assert status.state is PluginState.RUNNING, status
        assert status.pid is not None
        process = psutil.Process(status.pid)
        assert process.uids().real == process.uids().effective == nobody.pw_uid
        assert process.gids().effective == nobody.pw_gid
        status_lines = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{status.pid}/status").read_text().splitlines()
        )
        # None of root's groups, no capabilities, and no way back up through a setuid binary.
        assert "0" not in status_lines["Groups"].split()
        assert int(status_lines["CapEff"], 16) == 0 and int(status_lines["CapPrm"], 16) == 0
        assert status_lines["NoNewPrivs"].strip() == "1"
        environ = process.environ()
        assert (environ["HOME"], environ["USER"]) == (nobody.pw_dir, "nobody")
        # Its private directory is its own (0700); the socket root above is only passable.
        private = Path(environ["TMPDIR"])
        assert (private.stat().st_uid, private.stat().st_mode & 0o777) == (nobody.pw_uid, 0o700)
        assert private.parent.stat().st_mode & 0o777 == 0o711
        health = await host.registry.client(PLUGIN_ID).check_health(
            pb.CheckHealthRequest(pluginContext=pb.PluginContext(orgId=1)), timeout=5
        )
        assert health.status == pb.CheckHealthResponse.OK
    assert not psutil.pid_exists(status.pid) or psutil.Process(status.pid).status() == "zombie"


RUN_AS_HOST = """
import asyncio, json, sys
from pathlib import Path
from plugin_host.process import resolve_run_as
from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginTarget, SupervisorOptions
from tests.helpers import plugin_env

async def main() -> None:
    options = SupervisorOptions(start_timeout=15, run_as=resolve_run_as("nobody"))
    registry = PluginRegistry(options=options)
    registry.add(PluginTarget(plugin_id="p", executable=Path(sys.argv[1]), env=plugin_env()))
    (status,) = await registry.start(wait=20)
    print(json.dumps({"pid": status.pid}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@needs_root
@pytest.mark.go
def test_a_plugin_run_as_another_user_still_dies_with_the_bridge(go_fixture_binary: Path) -> None:
    """The parent-death signal survives setpriv's user switch: SIGKILL the host, plugin gone."""
    root = Path(__file__).resolve().parents[2]
    host = subprocess.Popen(
        [sys.executable, "-c", RUN_AS_HOST, str(go_fixture_binary)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None
        pid = json.loads(host.stdout.readline())["pid"]
        assert isinstance(pid, int)
        assert psutil.Process(pid).uids().effective == pwd.getpwnam("nobody").pw_uid
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
