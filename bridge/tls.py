"""TLS for the bridge's listener: local certificates, and the server's SSL context.

``grafana-bridge certs`` makes a private CA and, signed by it, a server certificate for the
names the bridge is reached by (``ca.crt``/``ca.key``, ``server.crt``/``server.key``), and on
request client certificates for client-certificate authentication. It never overwrites a file
that exists (unless ``--force``), so running it on every start, as the quick start does, keeps
the CA that kubeconfigs and curl commands already trust; half a pair (a certificate without its
key, or a server certificate without the CA) is an error rather than a reason to start over.

A client certificate names its user the way Kubernetes reads one: the subject's common name
(CN) is the login, each organization (O) a group. ``server_ssl_context`` verifies client
certificates against ``server.client_ca`` when one is configured: ``client_auth: optional``
(the Kubernetes way) checks a certificate when the client sends one, ``required`` refuses the
TLS handshake without one. Keys are P-256 ECDSA, written with mode 0600 through a fresh
``O_EXCL`` temporary file; leaf certificates carry keyUsage digitalSignature and one
extKeyUsage (serverAuth or clientAuth), so a server certificate cannot log in as a client.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import ssl
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from bridge.config import BridgeConfig, ServerSettings

DEFAULT_DIR = Path("data/tls")
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity Apple's and browsers' TLS policies accept


class TLSError(Exception):
    """Certificates cannot be made or loaded; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


# -- making certificates ---------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_file(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the start, all at once or not at all.

    The bytes go to a new temporary file (``O_EXCL``, so a leftover or a planted symlink is
    never reused or followed) that then takes the name: with ``replace`` atomically over what
    was there, otherwise only if nothing is there yet, so a file is never silently replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise TLSError(f"{path} already exists; not replacing it") from None
    finally:
        temporary.unlink(missing_ok=True)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, *, replace: bool) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(path, data, mode=0o600, replace=replace)


def _write_cert(path: Path, cert: x509.Certificate, *, replace: bool) -> None:
    data = cert.public_bytes(serialization.Encoding.PEM)
    _write_file(path, data, mode=0o644, replace=replace)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(
    pair: CertPair, *, common_name: str = "grafana-bridge local CA", replace: bool = False
) -> None:
    """A self-signed CA certificate that may only sign end-entity certificates."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pair.key, key, replace=replace)
    _write_cert(pair.cert, cert, replace=replace)


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _load_ca(ca: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TLSError(f"cannot load the CA {ca.cert} / {ca.key}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSError(f"{ca.key}: only ECDSA CA keys are supported")
    return cert, key


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(
    ca: CertPair,
    pair: CertPair,
    *,
    common_name: str,
    organizations: Sequence[str] = (),
    hosts: Sequence[str] = (),
    client: bool = False,
    replace: bool = False,
) -> None:
    """A certificate signed by ``ca``: for a server (``hosts`` as SANs) or a client."""
    if not common_name:
        raise TLSError("a certificate needs a common name")
    if not client and not hosts:
        raise TLSError("a server certificate needs at least one host name or address")
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    now = _now()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(pair.key, key, replace=replace)
    _write_cert(pair.cert, cert, replace=replace)


@dataclass(frozen=True, slots=True)
class Made:
    """What :func:`ensure_server_certs` did: the files, and which were created now."""

    ca: CertPair
    server: CertPair
    created: tuple[Path, ...]


def ensure_server_certs(
    directory: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, force: bool = False
) -> Made:
    """``ca.*`` and ``server.*`` in ``directory``; existing files are kept unless ``force``.

    A new CA always gets a new server certificate, since the old one would not verify.
    """
    ca = CertPair(directory / "ca.crt", directory / "ca.key")
    server = CertPair(directory / "server.crt", directory / "server.key")
    if not force:
        _refuse_half_pair(ca)
        _refuse_half_pair(server)
        if not ca.cert.exists() and server.cert.exists():
            raise TLSError(
                f"{server.cert} exists but {ca.cert} does not; a new CA would replace it: "
                "put the CA back, or pass --force to make a new CA and server certificate"
            )
    created: list[Path] = []
    new_ca = force or not ca.cert.exists()
    if new_ca:
        create_ca(ca, replace=force)
        created += [ca.cert, ca.key]
    if new_ca or not server.cert.exists():
        issue(ca, server, common_name="grafana-bridge", hosts=hosts, replace=force)
        created += [server.cert, server.key]
    return Made(ca=ca, server=server, created=tuple(created))


def _refuse_half_pair(pair: CertPair) -> None:
    present = [p for p in (pair.cert, pair.key) if p.exists()]
    if len(present) == 1:
        missing = pair.key if present[0] == pair.cert else pair.cert
        raise TLSError(
            f"{present[0]} exists but {missing} does not: put it back, or pass --force to "
            "make a new CA and server certificate (replacing both)"
        )


# -- the server's SSL context ----------------------------------------------------------------


def server_ssl_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The listener's context, or None for plain HTTP; raises TLSError naming the bad key."""
    if server.tls_cert is None and server.tls_key is None:
        if server.client_ca is not None:
            raise TLSError("server.client_ca needs TLS: set server.tls_cert and server.tls_key")
        return None
    if server.tls_cert is None or server.tls_key is None:
        raise TLSError("server.tls_cert and server.tls_key must be set together")
    if server.client_auth == "required" and server.client_ca is None:
        # Otherwise "required" would quietly admit clients without any certificate.
        raise TLSError("server.client_auth 'required' needs server.client_ca (the CA to trust)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"server.tls_cert/tls_key: cannot load: {exc}") from None
    if server.client_ca is not None:
        try:
            context.load_verify_locations(cafile=server.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(f"server.client_ca: cannot load {server.client_ca}: {exc}") from None
        required = server.client_auth == "required"
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return context


def peer_subject(peercert: Any) -> tuple[str, tuple[str, ...]] | None:
    """(CN, every O) of a verified peer certificate as ``SSLSocket.getpeercert()`` gives it.

    ``peercert`` is empty or None when the client sent no certificate, or when the listener
    does not verify client certificates, so an unverified certificate never names anyone.
    """
    if not isinstance(peercert, dict) or not peercert:
        return None
    common_name = ""
    organizations: list[str] = []
    for rdn in peercert.get("subject", ()):
        for attribute in rdn:
            if not isinstance(attribute, tuple) or len(attribute) != 2:
                continue
            kind, value = attribute
            if kind == "commonName" and not common_name:
                common_name = str(value)
            elif kind == "organizationName":
                organizations.append(str(value))
    if not common_name:
        return None
    return common_name, tuple(organizations)


# -- grafana-bridge certs ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``certs`` subcommand's options."""
    parser.add_argument(
        "-d",
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"where the certificates are kept (default {DEFAULT_DIR})",
    )
    parser.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="a name or address the server certificate is valid for (repeatable; default "
        + ", ".join(DEFAULT_HOSTS)
        + ")",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="make a new CA and server certificate anyway (and replace --client's files)",
    )
    parser.add_argument(
        "--client",
        metavar="LOGIN",
        help="also issue a client certificate with this CN (the login) as LOGIN.crt/LOGIN.key",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME",
        help="an O (group) in the client certificate (repeatable)",
    )


def _client_pair(directory: Path, login: str) -> CertPair:
    """Where ``--client login`` goes: ``login.crt``/``login.key``, never the CA's or server's."""
    if "/" in login or "\0" in login or login.startswith("."):
        raise TLSError(f"--client {login!r}: not usable as a file name")
    if login in ("ca", "server"):
        raise TLSError(
            f"--client {login!r}: {login}.crt and {login}.key are the {login}'s own files; "
            "choose another login"
        )
    return CertPair(directory / f"{login}.crt", directory / f"{login}.key")


def run(config: BridgeConfig, args: argparse.Namespace) -> int:
    """Make what is missing in ``args.dir`` and say what was made; 2 on failure."""
    directory: Path = args.dir
    try:
        made = ensure_server_certs(
            directory, hosts=tuple(args.host or DEFAULT_HOSTS), force=args.force
        )
        if args.client:
            client = _client_pair(directory, args.client)
            for path in (client.cert, client.key):
                if path.exists() and not args.force:
                    raise TLSError(f"{path} already exists; remove it, or pass --force")
            issue(
                made.ca,
                client,
                common_name=args.client,
                organizations=args.group,
                client=True,
                replace=args.force,
            )
            made = Made(made.ca, made.server, (*made.created, client.cert, client.key))
    except (TLSError, OSError) as exc:
        print(f"grafana-bridge certs: {exc}", file=sys.stderr)
        return 2
    for path in made.created:
        print(f"wrote {path}")
    if not made.created:
        print(f"{directory}: CA and server certificate already there")
    return 0
