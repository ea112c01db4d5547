"""MANIFEST.txt verification: one row per status rule, with keys generated in the test."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plugin_host.keyring import GRAFANA_KEY_ID, KeyRing, KeyRingError, parse_armored
from plugin_host.root_urls import RootURLError, compile_glob, root_url_matches
from plugin_host.signature import (
    LoadDecision,
    PluginSignature,
    SignatureStatus,
    SignatureType,
    collect_plugin_files,
    compute_signature,
    inherit_signature,
    loading_decision,
    sha256_file,
)
from tests.plugin_host.signing import (
    SigningKey,
    generate_test_key,
    make_signed_plugin,
    write_plugin,
)

PLUGIN_ID = "acme-test-datasource"
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_test_key("p521")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return generate_test_key("ed25519")


def build_plugin(root: Path) -> Path:
    plugin_dir = write_plugin(root / "plugin", plugin_id=PLUGIN_ID, backend=True)
    (plugin_dir / "module.js").write_text("define([], function () {});\n")
    (plugin_dir / "img").mkdir()
    (plugin_dir / "img" / "logo.svg").write_text("<svg/>\n")
    return plugin_dir


# --- how each row signs the directory -------------------------------------------------------

Signer = Callable[[Path, SigningKey, SigningKey], object]


def signed(**options: Any) -> Signer:
    return lambda d, key, other: make_signed_plugin(d, key, **options)


def signed_by_other_key(d: Path, key: SigningKey, other: SigningKey) -> None:
    make_signed_plugin(d, other)


def signed_by_other_key_claiming_ours(d: Path, key: SigningKey, other: SigningKey) -> None:
    make_signed_plugin(d, other, key_id=key.key_id)


def signed_claiming_other_key(d: Path, key: SigningKey, other: SigningKey) -> None:
    make_signed_plugin(d, key, key_id=other.key_id)


def unsigned(d: Path, key: SigningKey, other: SigningKey) -> None:
    return None


def manifest_bytes(data: bytes) -> Signer:
    return lambda d, key, other: (d / "MANIFEST.txt").write_bytes(data)


# --- what each row does to the directory after signing --------------------------------------

Change = Callable[[Path], object]


def nothing(d: Path) -> None:
    return None


def edit_signed_text(d: Path) -> None:
    manifest = d / "MANIFEST.txt"
    manifest.write_text(manifest.read_text().replace('"Test Org"', '"Evil Org"'))


def crlf_line_ends(d: Path) -> None:
    manifest = d / "MANIFEST.txt"
    manifest.write_bytes(manifest.read_bytes().replace(b"\n", b"\r\n"))


def prepend_blank_line(d: Path) -> None:
    manifest = d / "MANIFEST.txt"
    manifest.write_bytes(b"\n" + manifest.read_bytes())


def modify_module(d: Path) -> None:
    (d / "module.js").write_text("alert(1);\n")


def add_extra_file(d: Path) -> None:
    (d / "extra.txt").write_text("not signed\n")


def remove_logo(d: Path) -> None:
    (d / "img" / "logo.svg").unlink()


def symlink_outside(d: Path) -> None:
    (d / "passwd").symlink_to("/etc/passwd")


def broken_symlink(d: Path) -> None:
    (d / "dangling").symlink_to(d / "does-not-exist")


def symlinked_dir_inside(d: Path) -> None:
    (d / "img-link").symlink_to(d / "img", target_is_directory=True)


def symlinked_file_inside(d: Path) -> None:
    (d / "logo-link.svg").symlink_to(d / "img" / "logo.svg")


def nested_manifest(d: Path) -> None:
    (d / "img" / "MANIFEST.txt").write_text("nested manifests are ordinary files\n")


@dataclass(frozen=True)
class Case:
    expected: SignatureStatus
    detail: str
    sign: Signer = signed()  # noqa: RUF009 - a shared, stateless default is intended
    before: Change = nothing
    after: Change = nothing
    grafana_root_url: str | None = None
    plugin_id: str = PLUGIN_ID
    version: str | None = "1.0.0"
    trust_other_key: bool = False


CASES = {
    # valid
    "valid": Case(SignatureStatus.VALID, "signed by Test Org (private signature, key "),
    "valid, ed25519 key": Case(
        SignatureStatus.VALID, "signed by Test Org", sign=signed_by_other_key, trust_other_key=True
    ),
    "valid, CRLF line ends": Case(SignatureStatus.VALID, "signed by", after=crlf_line_ends),
    "valid, text before the message": Case(
        SignatureStatus.VALID, "signed by", after=prepend_blank_line
    ),
    "valid, symlinked dir is not covered": Case(
        SignatureStatus.VALID, "signed by", after=symlinked_dir_inside
    ),
    "valid, symlinked file inside is covered": Case(
        SignatureStatus.VALID, "signed by", before=symlinked_file_inside
    ),
    "valid, root URL matches": Case(
        SignatureStatus.VALID,
        "signed by",
        sign=signed(root_urls=["https://grafana.example.com/sub/"]),
        grafana_root_url="https://grafana.example.com/sub",
    ),
    "valid, private-glob root URL": Case(
        SignatureStatus.VALID,
        "private-glob signature",
        sign=signed(signature_type="private-glob", root_urls=["https://*.example.com/"]),
        grafana_root_url="https://grafana.example.com/",
    ),
    # unsigned
    "unsigned, no manifest": Case(SignatureStatus.UNSIGNED, "no MANIFEST.txt in", sign=unsigned),
    "unsigned, manifest under 10 bytes": Case(
        SignatureStatus.UNSIGNED,
        "too short to be a manifest (9 bytes)",
        sign=manifest_bytes(b"123456789"),
    ),
    # invalid
    "invalid, garbage": Case(
        SignatureStatus.INVALID,
        "not an OpenPGP cleartext-signed message",
        sign=manifest_bytes(b"this is not a signed manifest at all\n"),
    ),
    "invalid, garbage after the header": Case(
        SignatureStatus.INVALID,
        "MANIFEST.txt cannot be decoded",
        sign=manifest_bytes(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n{}\n"),
    ),
    "invalid, bad signature": Case(
        SignatureStatus.INVALID, "bad signature", after=edit_signed_text
    ),
    "invalid, unknown key": Case(
        SignatureStatus.INVALID, "signature made by unknown key id", sign=signed_by_other_key
    ),
    "invalid, unknown key claiming a known keyId": Case(
        SignatureStatus.INVALID,
        "signature made by unknown key id",
        sign=signed_by_other_key_claiming_ours,
    ),
    "invalid, keyId names another key": Case(
        SignatureStatus.INVALID,
        "does not name the key that signed it",
        sign=signed_claiming_other_key,
    ),
    "invalid, manifest v1": Case(
        SignatureStatus.INVALID,
        "manifestVersion '1.0.0' is not supported",
        sign=signed(overrides={"manifestVersion": "1.0.0"}),
    ),
    "invalid, no manifestVersion": Case(
        SignatureStatus.INVALID,
        "manifestVersion '' is not supported",
        sign=signed(overrides={"manifestVersion": None}),
    ),
    "invalid, no plugin": Case(
        SignatureStatus.INVALID,
        "manifest field 'plugin' is required",
        sign=signed(overrides={"plugin": None}),
    ),
    "invalid, no version": Case(
        SignatureStatus.INVALID,
        "manifest field 'version' is required",
        sign=signed(overrides={"version": ""}),
    ),
    "invalid, no keyId": Case(
        SignatureStatus.INVALID,
        "manifest field 'keyId' is required",
        sign=signed(overrides={"keyId": None}),
    ),
    "invalid, time 0": Case(
        SignatureStatus.INVALID,
        "manifest field 'time' is required",
        sign=signed(overrides={"time": 0}),
    ),
    "invalid, no files": Case(
        SignatureStatus.INVALID,
        "manifest field 'files' is required",
        sign=signed(overrides={"files": {}}),
    ),
    "invalid, no signedByOrg": Case(
        SignatureStatus.INVALID,
        "manifest field 'signedByOrg' is required",
        sign=signed(overrides={"signedByOrg": None}),
    ),
    "invalid, no signedByOrgName": Case(
        SignatureStatus.INVALID,
        "manifest field 'signedByOrgName' is required",
        sign=signed(overrides={"signedByOrgName": ""}),
    ),
    "invalid, unknown signatureType": Case(
        SignatureStatus.INVALID,
        "'self-made' is not a valid signature type",
        sign=signed(signature_type="self-made"),
    ),
    "invalid, time is a string": Case(
        SignatureStatus.INVALID,
        "manifest field 'time' must be an integer",
        sign=signed(overrides={"time": "yesterday"}),
    ),
    "invalid, root URL mismatch": Case(
        SignatureStatus.INVALID,
        "Grafana root URL https://other.example.com/ is not one of the manifest's root URLs",
        sign=signed(root_urls=["https://grafana.example.com/"]),
        grafana_root_url="https://other.example.com/",
    ),
    "invalid, root URLs but none configured": Case(
        SignatureStatus.INVALID,
        "no Grafana root URL is set",
        sign=signed(root_urls=["https://grafana.example.com/"]),
    ),
    "invalid, glob only for private-glob": Case(
        SignatureStatus.INVALID,
        "is not one of the manifest's root URLs",
        sign=signed(root_urls=["https://*.example.com/"]),
        grafana_root_url="https://grafana.example.com/",
    ),
    "invalid, symlink outside the plugin dir": Case(
        SignatureStatus.INVALID,
        "file 'passwd' is a symlink to /etc/passwd, outside the plugin directory",
        after=symlink_outside,
    ),
    "invalid, broken symlink": Case(
        SignatureStatus.INVALID, "file 'dangling' is a broken symlink", after=broken_symlink
    ),
    # modified
    "modified, hash mismatch": Case(
        SignatureStatus.MODIFIED, "file module.js is modified: sha256 mismatch", after=modify_module
    ),
    "modified, unlisted file": Case(
        SignatureStatus.MODIFIED,
        "file extra.txt is not listed in MANIFEST.txt",
        after=add_extra_file,
    ),
    "modified, nested MANIFEST.txt must be listed": Case(
        SignatureStatus.MODIFIED,
        "file img/MANIFEST.txt is not listed in MANIFEST.txt",
        after=nested_manifest,
    ),
    "modified, listed file missing": Case(
        SignatureStatus.MODIFIED,
        "file img/logo.svg is listed in MANIFEST.txt but missing",
        after=remove_logo,
    ),
    "modified, plugin id mismatch": Case(
        SignatureStatus.MODIFIED,
        "manifest plugin id 'acme-other-datasource' does not match plugin.json id "
        "'acme-test-datasource'",
        sign=signed(plugin_id="acme-other-datasource"),
    ),
    "modified, version mismatch": Case(
        SignatureStatus.MODIFIED,
        "manifest version '0.9.0' does not match plugin.json info.version '1.0.0'",
        sign=signed(version="0.9.0"),
    ),
    "modified, plugin.json has no version": Case(
        SignatureStatus.MODIFIED,
        "does not match plugin.json info.version ''",
        version=None,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_signature_status(
    case: Case, key: SigningKey, other_key: SigningKey, tmp_path: Path
) -> None:
    plugin_dir = build_plugin(tmp_path)
    case.before(plugin_dir)
    case.sign(plugin_dir, key, other_key)
    case.after(plugin_dir)
    keyring = key.keyring()
    if case.trust_other_key:
        keyring = keyring.merged(other_key.keyring())

    signature = compute_signature(
        plugin_dir,
        plugin_id=case.plugin_id,
        plugin_version=case.version,
        keyring=keyring,
        grafana_root_url=case.grafana_root_url,
    )

    assert signature.status is case.expected, signature.detail
    assert case.detail in signature.detail


def test_valid_signature_reports_signer(key: SigningKey, tmp_path: Path) -> None:
    plugin_dir = build_plugin(tmp_path)
    make_signed_plugin(plugin_dir, key, signature_type="commercial")

    signature = compute_signature(
        plugin_dir, plugin_id=PLUGIN_ID, plugin_version="1.0.0", keyring=key.keyring()
    )

    assert signature == PluginSignature(
        status=SignatureStatus.VALID,
        detail=f"signed by Test Org (commercial signature, key {key.key_id})",
        type=SignatureType.COMMERCIAL,
        signed_by_org="test-org",
        signed_by_org_name="Test Org",
        key_id=key.key_id,
    )


def test_core_plugin_is_internal(tmp_path: Path) -> None:
    signature = compute_signature(
        tmp_path, plugin_id="grafana", plugin_version=None, keyring=KeyRing(), core=True
    )
    assert signature.status is SignatureStatus.INTERNAL


def test_empty_plugin_dir_is_invalid(tmp_path: Path) -> None:
    signature = compute_signature(
        tmp_path, plugin_id=PLUGIN_ID, plugin_version="1.0.0", keyring=KeyRing()
    )
    assert signature.status is SignatureStatus.INVALID
    assert "has no files" in signature.detail


# --- a manifest signed by grafana.com with Grafana's real key -------------------------------


def copy_grafana_signed(tmp_path: Path) -> Path:
    target = tmp_path / "grafana-signed"
    shutil.copytree(DATA / "grafana-signed", target)
    return target


def test_real_grafana_signature_is_valid(tmp_path: Path) -> None:
    plugin_dir = copy_grafana_signed(tmp_path)

    signature = compute_signature(
        plugin_dir, plugin_id="test", plugin_version="1.0.0", keyring=KeyRing.load()
    )

    assert signature.status is SignatureStatus.VALID, signature.detail
    assert signature.type is SignatureType.GRAFANA
    assert signature.signed_by_org_name == "Grafana Labs"
    assert signature.key_id == GRAFANA_KEY_ID


def test_real_grafana_signature_detects_modification(tmp_path: Path) -> None:
    plugin_dir = copy_grafana_signed(tmp_path)
    (plugin_dir / "veryImportantFile").write_text("changed")

    signature = compute_signature(
        plugin_dir, plugin_id="test", plugin_version="1.0.0", keyring=KeyRing.load()
    )

    assert signature.status is SignatureStatus.MODIFIED
    assert signature.detail == "file veryImportantFile is modified: sha256 mismatch"


def test_real_grafana_signature_needs_grafana_key(tmp_path: Path) -> None:
    plugin_dir = copy_grafana_signed(tmp_path)

    signature = compute_signature(
        plugin_dir,
        plugin_id="test",
        plugin_version="1.0.0",
        keyring=KeyRing.load(include_grafana_key=False),
    )

    assert signature.status is SignatureStatus.INVALID
    assert signature.detail == f"signature made by unknown key id {GRAFANA_KEY_ID}"


# --- children and the loading decision -------------------------------------------------------


def test_child_inherits_parent_signature() -> None:
    parent = PluginSignature(
        status=SignatureStatus.MODIFIED, detail="file a.js is modified: sha256 mismatch"
    )

    child = inherit_signature(parent, parent_id="acme-app")

    assert child.status is SignatureStatus.MODIFIED
    assert child.inherited_from == "acme-app"
    assert child.detail == (
        "inherited from parent plugin 'acme-app': file a.js is modified: sha256 mismatch"
    )


def sig(status: SignatureStatus) -> PluginSignature:
    return PluginSignature(status=status, detail="why")


DECISIONS = {
    "valid loads": (SignatureStatus.VALID, False, frozenset(), True, False),
    "internal loads": (SignatureStatus.INTERNAL, False, frozenset(), True, False),
    "unsigned refused": (SignatureStatus.UNSIGNED, False, frozenset(), False, False),
    "unsigned in dev mode": (SignatureStatus.UNSIGNED, True, frozenset(), True, True),
    "unsigned allow-listed": (SignatureStatus.UNSIGNED, False, frozenset({"p"}), True, True),
    "unsigned, other id allowed": (
        SignatureStatus.UNSIGNED,
        False,
        frozenset({"q"}),
        False,
        False,
    ),
    "invalid even in dev mode": (SignatureStatus.INVALID, True, frozenset({"p"}), False, False),
    "modified even when allowed": (SignatureStatus.MODIFIED, True, frozenset({"p"}), False, False),
}


@pytest.mark.parametrize("row", DECISIONS.values(), ids=DECISIONS.keys())
def test_loading_decision(
    row: tuple[SignatureStatus, bool, frozenset[str], bool, bool],
) -> None:
    status, dev_mode, allowed, loads, warns = row

    decision = loading_decision("p", sig(status), dev_mode=dev_mode, allow_unsigned=allowed)

    assert isinstance(decision, LoadDecision)
    assert decision.load is loads
    assert (decision.warning is not None) is warns
    if not loads:
        assert status.value in decision.reason


def test_unsigned_refusal_says_how_to_allow() -> None:
    decision = loading_decision(
        "acme-x-panel", sig(SignatureStatus.UNSIGNED), dev_mode=False, allow_unsigned=frozenset()
    )
    assert "add 'acme-x-panel' to allow_unsigned" in decision.reason


# --- files and hashes ------------------------------------------------------------------------


def test_sha256_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "big.bin"
    path.write_bytes(data)

    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_collect_plugin_files_uses_forward_slash_relative_paths(tmp_path: Path) -> None:
    plugin_dir = build_plugin(tmp_path)
    (plugin_dir / "MANIFEST.txt").write_text("x" * 20)
    symlinked_dir_inside(plugin_dir)
    symlinked_file_inside(plugin_dir)

    assert collect_plugin_files(plugin_dir) == {
        "plugin.json",
        "gpx_acme-test-datasource_linux_amd64",
        "module.js",
        "img/logo.svg",
        "logo-link.svg",
        "MANIFEST.txt",
    }


# --- the key ring ----------------------------------------------------------------------------


def test_keyring_holds_grafana_key_by_default() -> None:
    keyring = KeyRing.load()
    grafana = keyring.find(GRAFANA_KEY_ID)

    assert grafana is not None
    assert grafana.user_ids == ("Grafana <eng@grafana.com>",)
    assert keyring.find(GRAFANA_KEY_ID.upper()) is grafana
    assert keyring.find(grafana.fingerprint) is grafana


def test_keyring_loads_operator_key_files(key: SigningKey, tmp_path: Path) -> None:
    key_file = tmp_path / "acme.asc"
    key_file.write_text(key.armored_public)

    keyring = KeyRing.load([key_file])

    assert len(keyring) == 2
    found = keyring.find(key.key_id)
    assert found is not None
    assert found.source == str(key_file)
    # Signatures are made by the signing subkey; its id must find the certificate too.
    assert all(keyring.find(sub) is found for sub in found.key_ids)


KEY_FILE_ERRORS = {
    "missing file": (None, "cannot read public key file"),
    "not a key": (b"hello", "is not an OpenPGP key"),
    "empty": (b"", "holds no OpenPGP public key"),
    "private key": (b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n", "holds a private key"),
}


@pytest.mark.parametrize("row", KEY_FILE_ERRORS.values(), ids=KEY_FILE_ERRORS.keys())
def test_keyring_rejects_bad_key_files(row: tuple[bytes | None, str], tmp_path: Path) -> None:
    content, message = row
    key_file = tmp_path / "key.asc"
    if content is not None:
        key_file.write_bytes(content)

    with pytest.raises(KeyRingError, match=message):
        KeyRing.load([key_file])


def test_binary_private_key_is_refused(key: SigningKey) -> None:
    with pytest.raises(KeyRingError, match="holds a private key"):
        parse_armored(bytes(key.secret), source="secret.gpg")


# --- root URLs -------------------------------------------------------------------------------

ROOT_URLS = {
    "exact": (["http://localhost:3000/grafana"], "http://localhost:3000/grafana", False, True),
    "trailing slash cleaned": (
        ["http://localhost:3000/grafana/"],
        "http://localhost:3000/grafana",
        False,
        True,
    ),
    "root path": (["https://g.example.com"], "https://g.example.com/", False, True),
    "dot segments cleaned": (
        ["https://g.example.com/a/./b/../c/"],
        "https://g.example.com/a/c",
        False,
        True,
    ),
    "other port": (["http://localhost:3000/"], "http://localhost:3001/", False, False),
    "other scheme": (["http://g.example.com/"], "https://g.example.com/", False, False),
    "other path": (["http://g.example.com/a"], "http://g.example.com/b", False, False),
    "user info ignored": (["http://u@g.example.com/"], "http://g.example.com/", False, True),
    "glob one label": (["https://*.example.com/"], "https://g.example.com/", True, True),
    "glob not across dots": (["https://*.example.com/"], "https://a.b.example.com/", True, False),
    "super glob": (["https://**.example.com/"], "https://a.b.example.com/", True, True),
    "glob alternatives": (["https://{a,b}.example.com/"], "https://b.example.com/", True, True),
    "glob class": (["https://g[0-9].example.com/"], "https://g7.example.com/", True, True),
    "glob negated class": (
        ["https://g[!0-9].example.com/"],
        "https://g7.example.com/",
        True,
        False,
    ),
    "second entry matches": (
        ["https://a.example.com/", "https://b.example.com/"],
        "https://b.example.com/",
        False,
        True,
    ),
}


@pytest.mark.parametrize("row", ROOT_URLS.values(), ids=ROOT_URLS.keys())
def test_root_url_matching(row: tuple[list[str], str, bool, bool]) -> None:
    specs, target, allow_glob, expected = row
    assert root_url_matches(specs, target, allow_glob=allow_glob) is expected


@pytest.mark.parametrize("pattern", ["https://{a,b.example.com/", "https://[a.example.com/"])
def test_malformed_glob_is_an_error(pattern: str) -> None:
    with pytest.raises(RootURLError):
        compile_glob(pattern)


def test_malformed_root_url_is_an_error() -> None:
    with pytest.raises(RootURLError):
        root_url_matches(["http://[::1/"], "http://localhost/", allow_glob=False)
