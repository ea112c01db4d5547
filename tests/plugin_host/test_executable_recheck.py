"""What was verified is what runs: the executable is re-hashed before every (re)start.

Real processes: the Python fixture plugin, started by a :class:`PluginHost` from a plugin
directory made for the test (signed with a throwaway key, or unsigned and allow-listed). The
test replaces the executable with one that would start just as well, kills the plugin, and
watches the supervisor refuse to run the replacement; restoring the original lets it recover.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from plugin_host.discovery import discover
from plugin_host.errors import PluginUnavailable
from plugin_host.host import HostConfig, PluginHost
from plugin_host.signature import SignatureStatus, sha256_file
from plugin_host.supervisor import PluginState, PluginStatus, RestartPolicy
from tests.conftest import PY_FIXTURE_DIR
from tests.plugin_host.signing import generate_test_key, make_signed_plugin
from tests.plugin_host.supervision import OPTIONS, wait_for

PLUGIN_ID = "bridge-recheck-datasource"
EXECUTABLE = "gpx_pyfixture_linux_amd64"
# Retry quickly and never give up for long, so a restored executable is picked up at once.
RETRY = RestartPolicy(
    initial_backoff=0.1, max_backoff=0.2, multiplier=2.0, jitter=0.0, crash_loop_threshold=100
)
CHANGED = "changed on disk since it was verified"


def write_plugin(directory: Path) -> Path:
    """The Python fixture under PLUGIN_ID: its plugin.json and a launcher; the launcher."""
    directory.mkdir(parents=True)
    manifest = json.loads((PY_FIXTURE_DIR / "plugin.json").read_text())
    manifest["id"] = PLUGIN_ID
    (directory / "plugin.json").write_text(json.dumps(manifest))
    launcher = directory / EXECUTABLE
    launcher.write_text(launcher_text())
    launcher.chmod(0o755)
    return launcher


def launcher_text(extra: str = "") -> str:
    return f'#!/bin/sh\n{extra}exec "{PY_FIXTURE_DIR / EXECUTABLE}" "$@"\n'


def replace_executable(launcher: Path, text: str) -> None:
    """Swap in a new file, as an upgrade or an attacker would (a new inode, same path)."""
    staged = launcher.with_name(launcher.name + ".new")
    staged.write_text(text)
    staged.chmod(0o755)
    os.replace(staged, launcher)


@asynccontextmanager
async def running(plugins: Path, **config: object) -> AsyncIterator[PluginHost]:
    host = PluginHost(
        HostConfig(
            plugin_dirs=(plugins,),
            supervisor=dataclasses.replace(OPTIONS, restart=RETRY),
            **config,  # type: ignore[arg-type]
        ),
        host_env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    async with host:
        await host.start(wait=20)
        assert host.registry.status(PLUGIN_ID).state is PluginState.RUNNING
        yield host


def kill(host: PluginHost) -> int:
    pid = host.registry.status(PLUGIN_ID).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


def refused(status: PluginStatus) -> bool:
    return status.state is PluginState.BACKING_OFF and CHANGED in (status.last_error or "")


async def assert_refused_then_recovers(host: PluginHost, launcher: Path, original: str) -> None:
    old_pid = kill(host)
    status = await wait_for(host.registry, PLUGIN_ID, refused)
    assert status.pid is None
    assert str(launcher) in (status.last_error or "")
    with pytest.raises(PluginUnavailable, match=CHANGED):  # what callers are told
        host.registry.client(PLUGIN_ID)
    # It stays refused: several more attempts, none of them runs the replacement.
    seen = status.consecutive_failures
    status = await wait_for(
        host.registry, PLUGIN_ID, lambda s: refused(s) and s.consecutive_failures >= seen + 2
    )
    assert status.pid is None
    replace_executable(launcher, original)
    status = await wait_for(host.registry, PLUGIN_ID, lambda s: s.state is PluginState.RUNNING)
    assert status.pid not in (None, old_pid)


async def test_signed_plugin_is_checked_against_its_manifest(short_tmp: Path) -> None:
    plugins = short_tmp / "plugins"
    launcher = write_plugin(plugins / PLUGIN_ID)
    key = generate_test_key()
    make_signed_plugin(plugins / PLUGIN_ID, key)
    key_file = short_tmp / "key.asc"
    key_file.write_text(key.armored_public)
    async with running(plugins, public_key_files=(key_file,), dev_mode=True) as host:
        spec = host.discovery.get(PLUGIN_ID)
        assert spec is not None and spec.signature.status is SignatureStatus.VALID
        # Even in dev mode: a signed plugin is held to its manifest.
        replace_executable(launcher, launcher_text("# not what was signed\n"))
        await assert_refused_then_recovers(host, launcher, launcher_text())


async def test_unsigned_plugin_is_checked_against_its_hash_at_discovery(short_tmp: Path) -> None:
    plugins = short_tmp / "plugins"
    launcher = write_plugin(plugins / PLUGIN_ID)
    async with running(plugins, allow_unsigned=frozenset({PLUGIN_ID})) as host:
        replace_executable(launcher, launcher_text("# swapped after discovery\n"))
        await assert_refused_then_recovers(host, launcher, launcher_text())


def point(link: Path, target: str) -> None:
    """Retarget the symlink ``link`` at once (a new link renamed over the old one)."""
    staged = link.with_name(link.name + ".link")
    staged.symlink_to(target)
    os.replace(staged, link)


async def test_a_symlinked_executable_is_checked_through_the_link(short_tmp: Path) -> None:
    """The hash is of what the link points to: pointing it at another file is a change."""
    plugins = short_tmp / "plugins"
    launcher = write_plugin(plugins / PLUGIN_ID)
    for version, extra in (("v1", ""), ("v2", "# another build\n")):
        real = launcher.with_name(f"launch-{version}.sh")
        real.write_text(launcher_text(extra))
        real.chmod(0o755)
    launcher.unlink()
    launcher.symlink_to("launch-v1.sh")
    async with running(plugins, allow_unsigned=frozenset({PLUGIN_ID})) as host:
        point(launcher, "launch-v2.sh")
        old_pid = kill(host)
        status = await wait_for(host.registry, PLUGIN_ID, refused)
        assert status.pid is None and str(launcher) in (status.last_error or "")
        point(launcher, "launch-v1.sh")
        status = await wait_for(host.registry, PLUGIN_ID, lambda s: s.state is PluginState.RUNNING)
        assert status.pid not in (None, old_pid)


async def test_unsigned_plugin_in_dev_mode_runs_a_rebuilt_executable(short_tmp: Path) -> None:
    plugins = short_tmp / "plugins"
    launcher = write_plugin(plugins / PLUGIN_ID)
    async with running(plugins, dev_mode=True) as host:
        replace_executable(launcher, launcher_text("# rebuilt while developing\n"))
        old_pid = kill(host)
        status = await wait_for(
            host.registry,
            PLUGIN_ID,
            lambda s: s.state is PluginState.RUNNING and s.pid not in (None, old_pid),
        )
        assert status.restarts == 1


@pytest.mark.parametrize("dev_mode", [False, True])
def test_discovery_records_what_the_executable_must_hash_to(
    short_tmp: Path, dev_mode: bool
) -> None:
    plugins = short_tmp / "plugins"
    launcher = write_plugin(plugins / PLUGIN_ID)
    unsigned = discover([plugins], allow_unsigned=frozenset({PLUGIN_ID}), dev_mode=dev_mode)
    spec = unsigned.get(PLUGIN_ID)
    assert spec is not None
    assert spec.executable_sha256 == (None if dev_mode else sha256_file(launcher))

    key = generate_test_key("ed25519")
    make_signed_plugin(plugins / PLUGIN_ID, key)
    listed = json.loads(_manifest_json(plugins / PLUGIN_ID / "MANIFEST.txt"))["files"][EXECUTABLE]
    signed = discover([plugins], keyring=key.keyring(), dev_mode=dev_mode).get(PLUGIN_ID)
    assert signed is not None and signed.signature.status is SignatureStatus.VALID
    assert signed.executable_sha256 == listed == sha256_file(launcher)


def _manifest_json(path: Path) -> str:
    """The JSON body of a clear-signed MANIFEST.txt (between the armour header and signature)."""
    text = path.read_text()
    body = text.split("\n\n", 1)[1]
    return body.split("-----BEGIN PGP SIGNATURE-----", 1)[0]
