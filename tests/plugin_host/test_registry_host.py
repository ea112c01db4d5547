"""The registry's socket directory and the host's loading, across their whole lifecycle."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil

from plugin_host.host import HostConfig, PluginHost
from plugin_host.process import make_socket_root, sweep_stale_socket_roots
from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginState, PluginTarget
from tests.helpers import GO_FIXTURE_ID, PY_FIXTURE, PY_FIXTURE_ID, ROOT, plugin_env
from tests.plugin_host.supervision import OPTIONS

FIXTURE_PLUGINS = ROOT / "fixtures" / "plugins"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_registry_makes_its_socket_root_when_needed_private_every_time() -> None:
    registry = PluginRegistry(options=OPTIONS)
    assert registry.socket_root is None  # constructing one leaves nothing behind
    registry.add(PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env()))
    for _ in range(2):
        [status] = await registry.start(wait=30)
        assert status.state is PluginState.RUNNING, status.last_error
        root = registry.socket_root
        assert root is not None and mode(root) == 0o700
        assert status.address is not None and Path(status.address).is_relative_to(root)
        await registry.stop()
        assert not root.exists() and registry.socket_root is None


async def test_stop_tolerates_plugins_added_while_it_runs(short_tmp: Path) -> None:
    registry = PluginRegistry(options=OPTIONS, socket_root=short_tmp)
    registry.add(PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env()))
    await registry.start(wait=30)
    stopping = asyncio.create_task(registry.stop())
    await asyncio.sleep(0.05)
    registry.add(PluginTarget(plugin_id="late", executable=PY_FIXTURE, env=plugin_env()))
    await stopping
    assert registry.status(PY_FIXTURE_ID).state is PluginState.STOPPED


def test_stale_socket_roots_are_swept_and_live_ones_kept(short_tmp: Path) -> None:
    # A root whose owner is gone: a short-lived process that has exited.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = short_tmp / "gfbridge-stale"
    (stale / "plugin-x").mkdir(parents=True)
    (stale / "owner").write_text(f"{dead.stdout.strip()} 12345.0\n")
    # A root whose owner is alive, one whose pid was reused, and one without an owner file.
    me = psutil.Process()
    live = short_tmp / "gfbridge-live"
    live.mkdir()
    (live / "owner").write_text(f"{me.pid} {me.create_time()!r}\n")
    reused = short_tmp / "gfbridge-reused"
    reused.mkdir()
    (reused / "owner").write_text(f"{me.pid} {me.create_time() - 3600!r}\n")
    unknown = short_tmp / "gfbridge-unknown"
    unknown.mkdir()
    other = short_tmp / "not-ours"
    other.mkdir()
    (other / "owner").write_text("1 0.0\n")

    assert sorted(sweep_stale_socket_roots(short_tmp)) == [reused, stale]
    assert live.exists() and unknown.exists() and other.exists()

    root = make_socket_root(short_tmp)
    assert mode(root) == 0o700
    assert (root / "owner").read_text().split()[0] == str(os.getpid())
    assert sweep_stale_socket_roots(short_tmp) == []


async def test_host_load_is_idempotent_and_disabled_covers_attach() -> None:
    config = HostConfig(
        plugin_dirs=(FIXTURE_PLUGINS,),
        allow_unsigned=frozenset({PY_FIXTURE_ID, GO_FIXTURE_ID}),
        attach={"debugged-datasource": "127.0.0.1:1", "off-datasource": "127.0.0.1:2"},
        disabled=frozenset({"off-datasource"}),
        plugin_env={PY_FIXTURE_ID: {"API_TOKEN": "s3cr3t-token"}},
        plugin_settings={PY_FIXTURE_ID: {"password": "s3cr3t-password"}},
    )
    host = PluginHost(config, host_env={"AWS_SECRET_ACCESS_KEY": "s3cr3t-key"})
    await host.load()
    loaded = host.registry.plugin_ids()
    assert PY_FIXTURE_ID in loaded and "debugged-datasource" in loaded
    assert "off-datasource" not in loaded
    async with host:  # loads again: must not fail with "already registered"
        assert host.registry.plugin_ids() == loaded
    shown = repr(config) + repr(host.registry.supervisor(PY_FIXTURE_ID).target)
    assert "s3cr3t" not in shown
