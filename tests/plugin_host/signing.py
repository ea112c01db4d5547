"""Test helpers: throwaway OpenPGP keys, plugin directories, and MANIFEST.txt files signed with them."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pysequoia

from plugin_host.keyring import KeyRing, PublicKey
from plugin_host.signature import MANIFEST_NAME, collect_plugin_files, sha256_file

KeyAlgorithm = Literal["p521", "ed25519"]

_SUITES = {
    "p521": pysequoia.CipherSuite.P521,  # what Grafana's own signing key uses
    "ed25519": pysequoia.CipherSuite.Cv25519,
}

EM_X86_64 = 62
EM_AARCH64 = 183


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A freshly generated secret key and its public half."""

    secret: pysequoia.Tsk
    public: PublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @property
    def armored_public(self) -> str:
        return str(self.public.cert)

    def keyring(self) -> KeyRing:
        return KeyRing([self.public])

    def clear_sign(self, text: bytes) -> bytes:
        signer = self.secret.signer()
        return pysequoia.sign(signer, text, mode=pysequoia.SignatureMode.CLEAR)


def generate_test_key(
    algorithm: KeyAlgorithm = "p521", *, user_id: str = "Plugin Signer <signer@example.com>"
) -> SigningKey:
    secret = pysequoia.Tsk.generate(user_id, cipher_suite=_SUITES[algorithm])
    cert = secret.extract_certificate()
    return SigningKey(secret=secret, public=PublicKey.from_cert(cert, source="test key"))


def manifest_body(
    plugin_dir: Path,
    *,
    plugin_id: str,
    version: str,
    key_id: str,
    signature_type: str = "private",
    signed_by_org: str = "test-org",
    signed_by_org_name: str = "Test Org",
    root_urls: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A v2 manifest covering every file now in ``plugin_dir``; ``overrides`` replace fields
    (a value of None removes the field)."""
    files = {
        rel: sha256_file(plugin_dir / rel)
        for rel in sorted(collect_plugin_files(plugin_dir))
        if rel != MANIFEST_NAME
    }
    body: dict[str, Any] = {
        "manifestVersion": "2.0.0",
        "signatureType": signature_type,
        "signedByOrg": signed_by_org,
        "signedByOrgName": signed_by_org_name,
        "plugin": plugin_id,
        "version": version,
        "time": int(time.time() * 1000),
        "keyId": key_id,
        "files": files,
    }
    if root_urls is not None:
        body["rootUrls"] = root_urls
    for name, value in (overrides or {}).items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def make_signed_plugin(
    plugin_dir: Path,
    key: SigningKey,
    *,
    plugin_id: str | None = None,
    version: str | None = None,
    **manifest_options: Any,
) -> Path:
    """Sign ``plugin_dir`` as it is now: write a clear-signed MANIFEST.txt and return its path.

    The plugin id and version default to those in the directory's plugin.json.
    """
    plugin_json = json.loads((plugin_dir / "plugin.json").read_text())
    body = manifest_body(
        plugin_dir,
        plugin_id=plugin_id if plugin_id is not None else plugin_json["id"],
        version=version if version is not None else plugin_json["info"]["version"],
        key_id=manifest_options.pop("key_id", key.key_id),
        **manifest_options,
    )
    manifest = plugin_dir / MANIFEST_NAME
    manifest.write_bytes(key.clear_sign(json.dumps(body, indent=2).encode() + b"\n"))
    return manifest


def elf_header(machine: int, *, bits: int = 64, little_endian: bool = True) -> bytes:
    """The first 64 bytes of an ELF executable for ``machine`` (enough to identify it)."""
    order: Literal["little", "big"] = "little" if little_endian else "big"
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1 if little_endian else 2, 1])
    ident = ident.ljust(16, b"\0")
    return (ident + (2).to_bytes(2, order) + machine.to_bytes(2, order)).ljust(64, b"\0")


def write_plugin(
    plugin_dir: Path,
    *,
    plugin_id: str,
    plugin_type: str = "datasource",
    version: str | None = "1.0.0",
    backend: bool = False,
    executable: str | None = None,
    binary: bytes | None = None,
    binary_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a plugin.json (and, for backends, a binary) into ``plugin_dir``; return the dir.

    The binary defaults to an x86-64 ELF header named for linux/amd64, mode 0755.
    """
    plugin_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"id": plugin_id, "type": plugin_type, "name": plugin_id}
    if version is not None:
        doc["info"] = {"version": version}
    if backend:
        doc["backend"] = True
        doc["executable"] = executable or f"gpx_{plugin_id}"
    doc.update(extra or {})
    (plugin_dir / "plugin.json").write_text(json.dumps(doc, indent=2))
    if backend:
        name = binary_name or f"{doc['executable']}_linux_amd64"
        path = plugin_dir / name
        path.write_bytes(binary if binary is not None else elf_header(EM_X86_64))
        path.chmod(0o755)
    return plugin_dir
