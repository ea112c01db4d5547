"""MANIFEST.txt verification: a plugin's signature status, computed the way Grafana does."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import pysequoia

from plugin_host.keyring import KeyRing, PublicKey, key_id_of, sequoia_message
from plugin_host.platform import go_os
from plugin_host.root_urls import RootURLError, root_url_matches

MANIFEST_NAME = "MANIFEST.txt"
HASH_CHUNK = 1 << 20
_CLEARSIGN_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
_MIN_MANIFEST_BYTES = 10


class SignatureStatus(StrEnum):
    INTERNAL = "internal"  # a core plugin: trusted without a manifest
    VALID = "valid"
    UNSIGNED = "unsigned"  # no usable MANIFEST.txt
    INVALID = "invalid"  # the manifest or its signature cannot be trusted
    MODIFIED = "modified"  # trusted manifest, but the files on disk differ from it


class SignatureType(StrEnum):
    GRAFANA = "grafana"
    COMMERCIAL = "commercial"
    COMMUNITY = "community"
    PRIVATE = "private"
    PRIVATE_GLOB = "private-glob"


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginSignature:
    """A plugin's signature status and, in ``detail``, precisely why it has that status."""

    status: SignatureStatus
    detail: str
    type: SignatureType | None = None
    signed_by_org: str | None = None
    signed_by_org_name: str | None = None
    key_id: str | None = None
    inherited_from: str | None = None
    # A valid manifest's SHA-256 per file, relative to ``manifest_dir`` (a nested plugin keeps
    # its parent's), so a file can be checked against the manifest again before it runs.
    files: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    manifest_dir: Path | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The signed JSON body of a MANIFEST.txt, after its signature was verified."""

    plugin: str
    version: str
    key_id: str
    time: int
    files: Mapping[str, str]
    manifest_version: str = ""
    signature_type: str = ""
    signed_by_org: str = ""
    signed_by_org_name: str = ""
    root_urls: tuple[str, ...] = ()
    signer: PublicKey | None = field(default=None, compare=False)

    @property
    def is_v2(self) -> bool:
        return self.manifest_version.startswith("2.")


class ManifestError(ValueError):
    """MANIFEST.txt is not a trustworthy manifest; the message says why."""


class PluginFilesError(OSError):
    """The plugin directory cannot be listed safely (e.g. a symlink leads outside it)."""


# ---------------------------------------------------------------------------------------------
# Files and hashes


def sha256_file(path: Path, *, chunk_size: int = HASH_CHUNK) -> str:
    """Lowercase hex SHA-256 of a file, read in chunks so large binaries stay out of memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(signature: PluginSignature, path: Path) -> str | None:
    """The SHA-256 a valid signature's manifest lists for ``path``; None if it lists none."""
    if signature.status is not SignatureStatus.VALID or signature.manifest_dir is None:
        return None
    try:
        relative = path.relative_to(signature.manifest_dir).as_posix()
    except ValueError:
        return None
    return signature.files.get(relative)


def executable_changed(path: Path, expected_sha256: str) -> str | None:
    """Why ``path`` must not run: it no longer hashes to ``expected_sha256``; None if it does.

    Blocking (hashes the file): call it from a thread when on the event loop.
    """
    try:
        actual = sha256_file(path)
    except OSError as exc:
        return f"cannot re-check executable {path} before starting it: {exc.strerror or exc}"
    if actual != expected_sha256:
        return (
            f"executable {path} changed on disk since it was verified (sha256 {actual[:16]}, "
            f"expected {expected_sha256[:16]}); refusing to run it"
        )
    return None


def collect_plugin_files(plugin_dir: Path) -> frozenset[str]:
    """Every file a manifest must cover, as forward-slash paths relative to ``plugin_dir``.

    Like Grafana: symlinked directories are neither listed nor entered, symlinked files are
    listed under the link's own path, and any symlink resolving outside the plugin directory
    makes the whole directory untrustworthy.
    """
    root = Path(os.path.realpath(plugin_dir))
    files: set[str] = set()

    def fail(exc: OSError) -> None:
        raise PluginFilesError(f"cannot list {exc.filename}: {exc.strerror}")

    for dirpath, dirnames, filenames in os.walk(plugin_dir, onerror=fail):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = base / name
            relative = path.relative_to(plugin_dir).as_posix()
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.exists():
                    raise PluginFilesError(f"file '{relative}' is a broken symlink")
                if not target.is_relative_to(root):
                    raise PluginFilesError(
                        f"file '{relative}' is a symlink to {target}, outside the plugin directory"
                    )
                if target.is_dir():
                    continue
            elif name in dirnames:
                continue
            files.add(relative)
    return frozenset(files)


# ---------------------------------------------------------------------------------------------
# The manifest itself


def read_manifest(data: bytes, keyring: KeyRing) -> Manifest:
    """Verify a clear-signed MANIFEST.txt against ``keyring`` and parse its signed body.

    Only text covered by a good signature is ever parsed.
    """
    start = data.find(_CLEARSIGN_BEGIN)
    if start < 0:
        raise ManifestError("MANIFEST.txt is not an OpenPGP cleartext-signed message")

    asked_for: list[str] = []

    def certs_for(ids: list[str]) -> list[pysequoia.Cert]:
        asked_for.extend(ids)
        return [key.cert for key in keyring.named_by_any(ids)]

    try:
        verified = pysequoia.verify(bytes=data[start:], store=certs_for)
    except (RuntimeError, ValueError) as exc:
        if not asked_for:
            raise ManifestError(f"MANIFEST.txt cannot be decoded: {sequoia_message(exc)}") from exc
        if not keyring.named_by_any(asked_for):
            raise ManifestError(
                f"signature made by unknown key id {_describe_ids(asked_for)}"
            ) from exc
        signers = ", ".join(key.key_id for key in keyring.named_by_any(asked_for))
        raise ManifestError(
            f"bad signature: the signature by key {signers} does not match the signed text"
        ) from exc
    if not verified.valid_sigs or verified.bytes is None:
        raise ManifestError("bad signature: no valid signature found")
    signer = keyring.find(verified.valid_sigs[0].certificate)

    try:
        body = json.loads(verified.bytes)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"manifest JSON is malformed at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest is not UTF-8 text: {exc.reason}") from exc
    except RecursionError:
        raise ManifestError("manifest JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise ManifestError("manifest JSON is not an object")
    manifest = _manifest_from_json(body, signer)
    _validate(manifest)
    return manifest


def _manifest_from_json(body: Mapping[str, Any], signer: PublicKey | None) -> Manifest:
    files = _get(body, "files", dict, {})
    for path, digest in files.items():
        if not isinstance(digest, str):
            raise ManifestError(f"manifest files[{path!r}] must be a string")
    root_urls = _get(body, "rootUrls", list, [])
    if not all(isinstance(url, str) for url in root_urls):
        raise ManifestError("manifest field 'rootUrls' must be a list of strings")
    time = _get(body, "time", int, 0)
    return Manifest(
        plugin=_get(body, "plugin", str, ""),
        version=_get(body, "version", str, ""),
        key_id=_get(body, "keyId", str, ""),
        time=time,
        files=dict(files),
        manifest_version=_get(body, "manifestVersion", str, ""),
        signature_type=_get(body, "signatureType", str, ""),
        signed_by_org=_get(body, "signedByOrg", str, ""),
        signed_by_org_name=_get(body, "signedByOrgName", str, ""),
        root_urls=tuple(root_urls),
        signer=signer,
    )


def _validate(manifest: Manifest) -> None:
    for name, value in (
        ("plugin", manifest.plugin),
        ("version", manifest.version),
        ("keyId", manifest.key_id),
        ("time", manifest.time),
        ("files", manifest.files),
    ):
        if not value:
            raise ManifestError(f"manifest field '{name}' is required")
    if not manifest.is_v2:
        raise ManifestError(
            f"manifestVersion {manifest.manifest_version!r} is not supported (need 2.x)"
        )
    for name, value in (
        ("signedByOrg", manifest.signed_by_org),
        ("signedByOrgName", manifest.signed_by_org_name),
    ):
        if not value:
            raise ManifestError(f"manifest field '{name}' is required")
    if manifest.signature_type not in SignatureType.__members__.values():
        raise ManifestError(f"{manifest.signature_type!r} is not a valid signature type")
    # Grafana fetches the key by the manifest's keyId; the key that signed must be that one.
    if manifest.signer is None or not manifest.signer.is_named_by(manifest.key_id):
        signer = manifest.signer.key_id if manifest.signer else "an unknown key"
        raise ManifestError(
            f"manifest keyId {manifest.key_id!r} does not name the key that signed it ({signer})"
        )


# ---------------------------------------------------------------------------------------------
# The status


def compute_signature(
    plugin_dir: Path,
    *,
    plugin_id: str,
    plugin_version: str | None,
    keyring: KeyRing,
    plugin_type: str = "",
    grafana_root_url: str | None = None,
    core: bool = False,
) -> PluginSignature:
    """The signature status of the plugin in ``plugin_dir``, following Grafana step by step.

    Blocking (walks and hashes files): call it from a thread when on the event loop.
    """
    if core:
        return PluginSignature(status=SignatureStatus.INTERNAL, detail="core plugin")
    try:
        files = collect_plugin_files(plugin_dir)
    except PluginFilesError as exc:
        return _invalid(str(exc))
    except OSError as exc:
        # Grafana refuses a plugin whose files it cannot list; never load what was not checked.
        return _invalid(f"cannot list the plugin's files: {exc.strerror or exc} ({exc.filename})")
    if not files:
        return _invalid(f"plugin directory {plugin_dir} has no files")
    if MANIFEST_NAME not in files:
        return PluginSignature(
            status=SignatureStatus.UNSIGNED, detail=f"no {MANIFEST_NAME} in {plugin_dir}"
        )
    try:
        data = (plugin_dir / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        return _invalid(f"{MANIFEST_NAME} cannot be read: {exc.strerror}")
    if len(data) < _MIN_MANIFEST_BYTES:
        return PluginSignature(
            status=SignatureStatus.UNSIGNED,
            detail=f"{MANIFEST_NAME} is too short to be a manifest ({len(data)} bytes)",
        )

    try:
        manifest = read_manifest(data, keyring)
    except ManifestError as exc:
        return _invalid(str(exc))

    if manifest.plugin != plugin_id:
        return _modified(
            f"manifest plugin id {manifest.plugin!r} does not match plugin.json id {plugin_id!r}"
        )
    if manifest.version != (plugin_version or ""):
        return _modified(
            f"manifest version {manifest.version!r} does not match plugin.json info.version "
            f"{plugin_version or ''!r}"
        )

    if manifest.root_urls:
        problem = _root_url_problem(manifest, grafana_root_url)
        if problem:
            return _invalid(problem)

    problem = _files_problem(plugin_dir, manifest, files, plugin_type=plugin_type)
    if problem:
        return _modified(problem)

    signature_type = SignatureType(manifest.signature_type)
    return PluginSignature(
        status=SignatureStatus.VALID,
        detail=(
            f"signed by {manifest.signed_by_org_name} ({signature_type} signature, "
            f"key {manifest.key_id})"
        ),
        type=signature_type,
        signed_by_org=manifest.signed_by_org,
        signed_by_org_name=manifest.signed_by_org_name,
        key_id=manifest.key_id,
        files=manifest.files,
        manifest_dir=plugin_dir,
    )


def _root_url_problem(manifest: Manifest, grafana_root_url: str | None) -> str | None:
    urls = ", ".join(manifest.root_urls)
    if not grafana_root_url:
        return f"manifest is only valid for root URLs [{urls}] and no Grafana root URL is set"
    try:
        matched = root_url_matches(
            list(manifest.root_urls),
            grafana_root_url,
            allow_glob=manifest.signature_type == SignatureType.PRIVATE_GLOB,
        )
    except RootURLError as exc:
        return f"root URL check failed: {exc}"
    if matched:
        return None
    return f"Grafana root URL {grafana_root_url} is not one of the manifest's root URLs [{urls}]"


def _files_problem(
    plugin_dir: Path, manifest: Manifest, files: frozenset[str], *, plugin_type: str
) -> str | None:
    # The cheap checks go first; all of them lead to the same status.
    listed = set(manifest.files)
    missing = sorted(listed - files)
    if missing:
        return f"{_plural_files(missing)} listed in {MANIFEST_NAME} but missing"

    unlisted = files - listed - {MANIFEST_NAME}
    # Chromium writes this log next to itself on Windows; Grafana tolerates it.
    if go_os() == "windows" and plugin_type == "renderer":
        unlisted -= {"chrome-win/debug.log"}
    if unlisted:
        return f"{_plural_files(sorted(unlisted))} not listed in {MANIFEST_NAME}"

    for relative in sorted(listed):
        try:
            digest = sha256_file(plugin_dir / relative)
        except OSError as exc:
            return f"file {relative} cannot be read: {exc.strerror}"
        if digest != manifest.files[relative]:
            return f"file {relative} is modified: sha256 mismatch"
    return None


# ---------------------------------------------------------------------------------------------
# Nested plugins and the loading decision


def inherit_signature(parent: PluginSignature, *, parent_id: str) -> PluginSignature:
    """A nested plugin's signature: its parent's, since the parent's manifest covers it."""
    if parent.status is SignatureStatus.INTERNAL:
        return parent
    return replace(
        parent,
        detail=f"inherited from parent plugin {parent_id!r}: {parent.detail}",
        inherited_from=parent_id,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadDecision:
    """Whether a plugin may load given its signature; ``warning`` is set for permitted risks."""

    load: bool
    reason: str
    warning: str | None = None


def loading_decision(
    plugin_id: str,
    signature: PluginSignature,
    *,
    dev_mode: bool,
    allow_unsigned: frozenset[str],
) -> LoadDecision:
    """Grafana's rule: valid and internal load; unsigned only in dev mode or when allowed."""
    status = signature.status
    if status in (SignatureStatus.VALID, SignatureStatus.INTERNAL):
        return LoadDecision(load=True, reason=f"signature {status}")
    if status is SignatureStatus.UNSIGNED:
        if plugin_id in allow_unsigned:
            why = "it is listed in allow_unsigned"
        elif dev_mode:
            why = "dev mode is on"
        else:
            return LoadDecision(
                load=False,
                reason=(
                    f"plugin is unsigned ({signature.detail}); add {plugin_id!r} to "
                    "allow_unsigned to load it anyway"
                ),
            )
        return LoadDecision(
            load=True,
            reason=f"unsigned, permitted because {why}",
            warning=(
                f"loading unsigned plugin {plugin_id!r} because {why}: its files are not "
                "verified (not recommended)"
            ),
        )
    return LoadDecision(load=False, reason=f"signature is {status}: {signature.detail}")


# ---------------------------------------------------------------------------------------------


def _invalid(detail: str) -> PluginSignature:
    return PluginSignature(status=SignatureStatus.INVALID, detail=detail)


def _modified(detail: str) -> PluginSignature:
    return PluginSignature(status=SignatureStatus.MODIFIED, detail=detail)


def _plural_files(paths: list[str]) -> str:
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return f"file {shown} is" if len(paths) == 1 else f"files {shown} are"


def _get(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    # JSON true is a Python int; Go refuses it for a number field, so do we.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ManifestError(f"manifest field '{key}' must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", dict: "an object", list: "a list"}.get(
        kind, kind.__name__
    )


def _describe_ids(ids: list[str]) -> str:
    # Fingerprints are long; the 16-hex key id is what MANIFEST.txt and people use.
    return ", ".join(dict.fromkeys(key_id_of(ident) for ident in ids))
