"""HTTPS and client-certificate authentication on a real ``grafana-bridge serve`` process.

Certificates come from ``grafana-bridge certs`` (the command operators use). Clients are real:
aiohttp with and without a client certificate, and kubectl with ``client-certificate-data``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509

from bridge.auth import AnonymousAuthenticator, AnonymousSettings, ClientCertAuthenticator
from bridge.cli import main
from bridge.config import ServerSettings
from bridge.identity import OrgRole
from bridge.tls import TLSError, peer_subject, server_ssl_context
from bridge.tokenfile import OrgGrant, TokenAuthenticator
from tests.bridge.bridge_process import (
    DPS_PATH,
    BridgeProcess,
    dataplaneservice,
    free_port,
    health_path,
    running_bridges,
    write_bridge_config,
)
from tests.conftest import IN_CI

pytestmark = pytest.mark.go

KUBECTL = Path(sys.executable).parent / "kubectl"
GROUP = "tls.pyfixture.datasource.grafana.app"
USERS = {
    "admin": {"org_id": 1, "role": "Admin"},
    "group:viewers": {"org_id": 1, "role": "Viewer"},
}


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def certs(directory: Path, *args: str) -> Run:
    """``grafana-bridge certs --dir directory …``, through the command's own entry point."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["certs", "--dir", str(directory), *args])
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _go_fixture_built(go_fixture_binary: Path) -> None:
    """fixtures/plugins is only complete once the Go fixture's binary is there."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and server certificate, client certificates for three callers, and a foreign CA."""
    directory = tmp_path_factory.mktemp("tls")
    for args in (
        ("--client", "admin"),
        ("--client", "carol", "--group", "viewers"),
        ("--client", "nobody"),
    ):
        result = certs(directory / "ours", *args)
        assert result.returncode == 0, result.stderr
    result = certs(directory / "foreign", "--client", "admin")
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def client_context(pki: Path, who: str | None, *, ca: str = "ours") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki / "ours" / "ca.crt")
    if who is not None:
        context.load_cert_chain(pki / ca / f"{who}.crt", pki / ca / f"{who}.key")
    return context


@pytest.fixture
def bridges() -> Iterator[list[BridgeProcess]]:
    with running_bridges() as started:
        yield started


def tls_bridge(
    tmp: Path, pki: Path, bridges: list[BridgeProcess], *, client_auth: str = "optional"
) -> BridgeProcess:
    port = free_port()
    ours = pki / "ours"
    server = {
        "tls_cert": str(ours / "server.crt"),
        "tls_key": str(ours / "server.key"),
        "client_ca": str(ours / "ca.crt"),
        "client_auth": client_auth,
    }
    config = write_bridge_config(
        tmp, port, storage={"backend": "memory"}, server=server, auth_users=USERS
    )
    bridge = BridgeProcess(config, port=port, ca_file=ours / "ca.crt")
    bridges.append(bridge)
    bridge.start()
    return bridge


async def call(
    session: aiohttp.ClientSession,
    bridge: BridgeProcess,
    context: ssl.SSLContext,
    method: str,
    path: str,
    body: Any = None,
) -> tuple[int, Any]:
    async with session.request(method, f"{bridge.url}{path}", json=body, ssl=context) as answer:
        if answer.content_type != "application/json":
            return answer.status, await answer.text()
        return answer.status, await answer.json()


async def test_client_certificates_name_the_caller(
    tmp_path: Path,
    pki: Path,
    bridges: list[BridgeProcess],
    session: aiohttp.ClientSession,
) -> None:
    bridge = tls_bridge(tmp_path, pki, bridges)
    await bridge.wait_ready(session)
    admin, carol, nobody = (client_context(pki, who) for who in ("admin", "carol", "nobody"))

    # CN=admin is the admin of auth.users: it may write, with no token at all.
    status, body = await call(session, bridge, admin, "POST", DPS_PATH, dataplaneservice(GROUP))
    assert status == 201, body
    # CN=carol, O=viewers: a Viewer through group:viewers; reads yes, writes no.
    status, body = await call(session, bridge, carol, "GET", f"{DPS_PATH}/v0alpha1.{GROUP}")
    assert status == 200 and body["spec"]["group"] == GROUP
    status, body = await call(session, bridge, carol, "DELETE", f"{DPS_PATH}/v0alpha1.{GROUP}")
    assert status == 403, body
    assert "carol" in body["message"]
    async with asyncio.timeout(10):
        while True:
            status, body = await call(session, bridge, carol, "GET", health_path(GROUP))
            if status == 200:
                break
            await asyncio.sleep(0.05)
    # A CN no grant names is authenticated but has no role: the front door refuses it.
    status, body = await call(session, bridge, nobody, "GET", health_path(GROUP))
    assert status == 403 and "nobody" in body["message"], body

    # Optional: without a certificate, the token is still how a caller is known.
    status, body = await bridge.request(session, "GET", f"{DPS_PATH}/v0alpha1.{GROUP}")
    assert status == 200, body
    status, body = await bridge.request(session, "GET", DPS_PATH, token=None)
    assert status == 401, body

    # A certificate another CA signed is refused in the handshake, never believed.
    foreign = client_context(pki, "admin", ca="foreign")
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(session, bridge, foreign, "GET", DPS_PATH)
    # ...and the bridge keeps serving everyone else.
    status, _ = await call(session, bridge, admin, "GET", DPS_PATH)
    assert status == 200


async def test_required_client_auth_refuses_a_client_without_a_certificate(
    tmp_path: Path,
    pki: Path,
    bridges: list[BridgeProcess],
    session: aiohttp.ClientSession,
) -> None:
    bridge = tls_bridge(tmp_path, pki, bridges, client_auth="required")
    admin = client_context(pki, "admin")
    async with asyncio.timeout(45):
        while True:
            try:
                status, _ = await call(session, bridge, admin, "GET", "/readyz")
            except aiohttp.ClientConnectionError:
                status = 0
            if status == 200:
                break
            assert bridge.process is not None and bridge.process.poll() is None, bridge.log
            await asyncio.sleep(0.1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await bridge.request(session, "GET", DPS_PATH)  # a token, but no certificate
    status, body = await call(session, bridge, admin, "GET", DPS_PATH)
    assert status == 200 and body["kind"] == "DataPlaneServiceList"


def kubeconfig_with_certificate(pki: Path, bridge: BridgeProcess, who: str, path: Path) -> Path:
    def data(name: str) -> str:
        return base64.b64encode((pki / "ours" / name).read_bytes()).decode()

    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "bridge",
                "cluster": {"server": bridge.url, "certificate-authority-data": data("ca.crt")},
            }
        ],
        "users": [
            {
                "name": who,
                "user": {
                    "client-certificate-data": data(f"{who}.crt"),
                    "client-key-data": data(f"{who}.key"),
                },
            }
        ],
        "contexts": [{"name": who, "context": {"cluster": "bridge", "user": who}}],
        "current-context": who,
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


async def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(KUBECTL),
        f"--kubeconfig={kubeconfig}",
        f"--cache-dir={kubeconfig.parent / 'kube-cache'}",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(
        process.communicate(stdin.encode() if stdin is not None else None), 60
    )
    return process.returncode or 0, out.decode()


async def test_kubectl_authenticates_with_a_client_certificate(
    tmp_path: Path,
    pki: Path,
    bridges: list[BridgeProcess],
    session: aiohttp.ClientSession,
) -> None:
    if not KUBECTL.exists():
        message = "kubectl is not installed; it is a dev dependency: pip install -e '.[dev]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    bridge = tls_bridge(tmp_path / "bridge", pki, bridges)
    await bridge.wait_ready(session)
    admin = kubeconfig_with_certificate(pki, bridge, "admin", tmp_path / "admin.kubeconfig")
    carol = kubeconfig_with_certificate(pki, bridge, "carol", tmp_path / "carol.kubeconfig")

    manifest = yaml.safe_dump(dataplaneservice(GROUP))
    code, out = await kubectl(admin, "apply", "-f", "-", stdin=manifest)
    assert code == 0, out
    assert f"dataplaneservice.aggregation.grafana.app/v0alpha1.{GROUP} created" in out
    code, out = await kubectl(carol, "get", "dataplaneservices", "-o", "name")
    assert code == 0, out
    assert out.split() == [f"dataplaneservice.aggregation.grafana.app/v0alpha1.{GROUP}"]
    code, out = await kubectl(carol, "delete", "dataplaneservice", f"v0alpha1.{GROUP}")
    assert code != 0 and "Forbidden" in out, out
    code, out = await kubectl(admin, "delete", "dataplaneservice", f"v0alpha1.{GROUP}")
    assert code == 0, out


# -- certs and the SSL context, without a server ----------------------------------------------


def test_certs_keeps_what_exists_and_replaces_it_only_with_force(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    first = certs(directory)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("wrote ") == 4
    ca = (directory / "ca.crt").read_bytes()
    for key in ("ca.key", "server.key"):
        assert (directory / key).stat().st_mode & 0o777 == 0o600
    again = certs(directory)
    assert again.returncode == 0 and "already there" in again.stdout
    assert (directory / "ca.crt").read_bytes() == ca
    forced = certs(directory, "--force")
    assert forced.returncode == 0 and (directory / "ca.crt").read_bytes() != ca
    bad = certs(directory, "--client", "../escape")
    assert bad.returncode == 2 and "--client" in bad.stderr


def test_server_certificate_names_the_requested_hosts(tmp_path: Path) -> None:
    result = certs(tmp_path, "--host", "bridge.example", "--host", "10.0.0.7")
    assert result.returncode == 0, result.stderr
    cert = ssl._ssl._test_decode_cert(str(tmp_path / "server.crt"))  # type: ignore[attr-defined]
    assert set(cert["subjectAltName"]) == {("DNS", "bridge.example"), ("IP Address", "10.0.0.7")}


def test_ssl_context_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(TLSError, match="client_ca needs TLS"):
        server_ssl_context(ServerSettings(client_ca=tmp_path / "ca.crt"))
    with pytest.raises(TLSError, match="set together"):
        server_ssl_context(ServerSettings(tls_cert=tmp_path / "a.crt"))
    assert certs(tmp_path).returncode == 0
    settings = ServerSettings(
        tls_cert=tmp_path / "server.crt",
        tls_key=tmp_path / "server.key",
        client_ca=tmp_path / "missing.crt",
    )
    with pytest.raises(TLSError, match=r"server.client_ca: cannot load"):
        server_ssl_context(settings)
    settings = settings.model_copy(update={"client_ca": tmp_path / "ca.crt"})
    assert server_ssl_context(settings).verify_mode == ssl.CERT_OPTIONAL  # type: ignore[union-attr]
    required = settings.model_copy(update={"client_auth": "required"})
    assert server_ssl_context(required).verify_mode == ssl.CERT_REQUIRED  # type: ignore[union-attr]
    assert server_ssl_context(ServerSettings()) is None


def test_peer_subject_reads_cn_and_every_o() -> None:
    cert = {
        "subject": (
            (("organizationName", "admins"),),
            (("organizationName", "ops"),),
            (("commonName", "alice"),),
        )
    }
    assert peer_subject(cert) == ("alice", ("admins", "ops"))
    assert peer_subject({}) is None  # no certificate, or an unverified one
    assert peer_subject(None) is None
    assert peer_subject({"subject": ((("organizationName", "x"),),)}) is None  # no CN


# -- review fixes: files are never overwritten or written with loose modes ---------------------


def test_a_stale_temporary_file_never_loosens_a_key(tmp_path: Path) -> None:
    """A leftover ``.server.key.tmp`` (0644, or a symlink) must not decide the key's mode."""
    directory = tmp_path / "tls"
    directory.mkdir()
    stale = directory / ".server.key.tmp"
    stale.write_text("left over by a crash\n")
    stale.chmod(0o644)
    elsewhere = tmp_path / "elsewhere"
    (directory / ".ca.key.tmp").symlink_to(elsewhere)
    result = certs(directory)
    assert result.returncode == 0, result.stderr
    for key in ("ca.key", "server.key"):
        assert (directory / key).stat().st_mode & 0o777 == 0o600
    assert not elsewhere.exists()  # the symlink was not followed


def test_certs_never_replaces_half_of_a_pair(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    assert certs(directory).returncode == 0
    ca = (directory / "ca.crt").read_bytes()
    server = (directory / "server.crt").read_bytes()
    # An operator who moved the CA key offline keeps the CA certificate.
    (directory / "ca.key").unlink()
    result = certs(directory)
    assert result.returncode == 2 and "ca.key" in result.stderr and "--force" in result.stderr
    assert (directory / "ca.crt").read_bytes() == ca
    assert (directory / "server.crt").read_bytes() == server
    # A server certificate from elsewhere is not replaced by one from a new CA.
    (directory / "ca.crt").unlink()
    result = certs(directory)
    assert result.returncode == 2 and "server.crt" in result.stderr
    assert (directory / "server.crt").read_bytes() == server
    assert not (directory / "ca.crt").exists()


@pytest.mark.parametrize("login", ["ca", "server", "alice"])
def test_a_client_certificate_never_replaces_an_existing_file(tmp_path: Path, login: str) -> None:
    assert certs(tmp_path, "--client", "alice").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = certs(tmp_path, "--client", login)
    assert result.returncode == 2 and f"{login}.crt" in result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_required_client_auth_without_a_client_ca_is_an_error(tmp_path: Path) -> None:
    assert certs(tmp_path).returncode == 0
    settings = ServerSettings(
        tls_cert=tmp_path / "server.crt", tls_key=tmp_path / "server.key", client_auth="required"
    )
    with pytest.raises(TLSError, match=r"client_auth.*client_ca"):
        server_ssl_context(settings)


def test_only_the_client_ca_is_trusted_for_client_certificates(tmp_path: Path) -> None:
    assert certs(tmp_path).returncode == 0
    settings = ServerSettings(
        tls_cert=tmp_path / "server.crt",
        tls_key=tmp_path / "server.key",
        client_ca=tmp_path / "ca.crt",
    )
    context = server_ssl_context(settings)
    assert context is not None and context.minimum_version >= ssl.TLSVersion.TLSv1_2
    trusted = context.get_ca_certs()  # never the system store: only server.client_ca
    assert [peer_subject(c) for c in trusted] == [("grafana-bridge local CA", ())]
    empty = tmp_path / "empty.crt"
    empty.write_text("")
    with pytest.raises(TLSError, match=r"server.client_ca: cannot load"):
        server_ssl_context(settings.model_copy(update={"client_ca": empty}))


async def test_a_server_certificate_cannot_log_in_as_a_client(tmp_path: Path) -> None:
    """extKeyUsage serverAuth only: OpenSSL refuses it as a client certificate (real sockets)."""
    assert certs(tmp_path, "--client", "alice").returncode == 0
    leaf = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    settings = ServerSettings(
        tls_cert=tmp_path / "server.crt",
        tls_key=tmp_path / "server.key",
        client_ca=tmp_path / "ca.crt",
        client_auth="required",
    )
    context = server_ssl_context(settings)
    seen: list[Any] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_subject(writer.get_extra_info("peercert")))
        writer.write(b"welcome")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        for who, accepted in (("alice", True), ("server", False)):
            client = ssl.create_default_context(cafile=tmp_path / "ca.crt")
            client.load_cert_chain(tmp_path / f"{who}.crt", tmp_path / f"{who}.key")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
                # TLS 1.3: the server checks the certificate after the client's handshake ends.
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
            except (ssl.SSLError, ConnectionError):
                answer = b""
            assert (answer == b"welcome") is accepted, (who, seen)
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [("alice", ())], seen


async def test_a_login_named_like_a_group_never_takes_the_groups_grant(tmp_path: Path) -> None:
    """CN ``group:admins`` (or a token-file user of that name) is not the admins group."""
    grants = {"group:admins": OrgGrant(org_id=1, role=OrgRole.ADMIN, server_admin=True)}
    by_cert = ClientCertAuthenticator(AnonymousAuthenticator(AnonymousSettings()), grants)
    impostor = by_cert.identify({"subject": ((("commonName", "group:admins"),),)})
    assert impostor is not None and impostor.role is OrgRole.NONE
    assert not impostor.is_server_admin
    member = by_cert.identify(
        {"subject": ((("commonName", "ann"),), (("organizationName", "admins"),))}
    )
    assert member is not None and member.role is OrgRole.ADMIN and member.is_server_admin
    token_file = tmp_path / "tokens.csv"
    token_file.write_text("s3cret,group:admins,u1\n")
    by_token = TokenAuthenticator(token_file, grants=grants)
    user = by_token.authenticate_headers({"Authorization": "Bearer s3cret"})
    assert user is not None and user.role is OrgRole.NONE and not user.is_server_admin
