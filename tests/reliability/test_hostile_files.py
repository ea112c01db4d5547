"""Hostile input the plugin host reads from plugins: handshake lines, plugin.json, MANIFEST.txt.

Property-based (hypothesis): generated and mutated inputs go through the real parsers, and
through discovery and signature checking of real plugin directories on disk. For each input the
result is either a valid value or the parser's own precise error (``HandshakeError``,
``PluginJSONError`` / a ``LoadError`` with a code, ``ManifestError`` / a signature status with a
detail) — never any other exception.

These are plain synchronous properties with no server, so hypothesis drives them directly.
``BRIDGE_HOSTILE_EXAMPLES`` (default 200) sets the examples per property; the counts tried per
input kind appear in the ``reliability figures`` summary.
"""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from plugin_host.discovery import LoadErrorCode, discover
from plugin_host.errors import HandshakeError
from plugin_host.handshake import HandshakeInfo, Network, parse_handshake
from plugin_host.plugin_json import PluginJSON, PluginJSONError, parse_plugin_json
from plugin_host.signature import (
    MANIFEST_NAME,
    ManifestError,
    SignatureStatus,
    compute_signature,
    read_manifest,
)
from tests.plugin_host.signing import (
    SigningKey,
    generate_test_key,
    manifest_body,
    write_plugin,
)
from tests.reliability.figures import record

EXAMPLES = int(os.environ.get("BRIDGE_HOSTILE_EXAMPLES", "200"))
pytestmark = pytest.mark.timeout(120 + EXAMPLES // 2)
SUITE = "hostile-files"
TRIED: Counter[str] = Counter()
OUTCOMES: Counter[tuple[str, str]] = Counter()


def tried(kind: str, outcome: str) -> None:
    """Count one case of ``kind`` and how it ended."""
    TRIED[kind] += 1
    OUTCOMES[kind, outcome] += 1


FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Signing and walking directories cost milliseconds per case: fewer of them.
SLOW = settings(FAST, max_examples=max(10, EXAMPLES // 4))


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    for kind in sorted(TRIED):
        outcomes = ", ".join(f"{o} {n}" for (k, o), n in sorted(OUTCOMES.items()) if k == kind)
        record(SUITE, f"{kind}: {TRIED[kind]} cases ({outcomes})")


# -- strategies --------------------------------------------------------------------------------

FIELD_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"])


def mutate(text: str) -> st.SearchStrategy[str]:
    """``text`` with characters inserted, deleted or replaced at drawn positions."""

    @st.composite
    def mutated(draw: st.DrawFn) -> str:
        out = text
        for _ in range(draw(st.integers(1, 4))):
            where = draw(st.integers(0, len(out)))
            op = draw(st.sampled_from(("insert", "delete", "replace", "duplicate")))
            piece = draw(st.text(FIELD_CHARS | st.sampled_from("|:/\n\r\0 "), max_size=8))
            if op == "insert":
                out = out[:where] + piece + out[where:]
            elif op == "delete":
                out = out[:where] + out[where + draw(st.integers(1, 8)) :]
            elif op == "replace":
                out = out[:where] + piece + out[where + len(piece) :]
            else:
                out = out[:where] + out[where:] + out[where:]
        return out

    return mutated()


VALID_LINES = (
    "1|2|unix|/tmp/plugin123/plugin.sock|grpc",
    "1|2|tcp|127.0.0.1:12345|grpc",
    "1|2|unix|/tmp/p.sock|grpc||true",
)

handshake_field = st.one_of(
    st.sampled_from(["1", "2", "0", "01", "+1", "-1", "\uff11", "99999999999999999999999", ""]),
    st.sampled_from(["unix", "tcp", "udp", "UNIX", "tcp6", "unix\0"]),
    st.sampled_from(["grpc", "netrpc", "GRPC", "", "grpc "]),
    st.sampled_from(["127.0.0.1:0", "127.0.0.1:65536", ":80", "[::1]:80", "host:", "/a.sock"]),
    st.text(FIELD_CHARS, max_size=80),
)
generated_lines = st.lists(handshake_field, min_size=0, max_size=9).map("|".join)
hostile_lines = st.one_of(
    generated_lines,
    st.sampled_from(VALID_LINES).flatmap(mutate),
    st.text(FIELD_CHARS, max_size=200),
)


@given(line=hostile_lines)
@example(line="1|2|unix|/x|grpc|" + "C" * 60)
@example(line="1|2|tcp|127.0.0.1:99999|grpc")
@example(line="\x00" * 4096)
@example(line="|" * 10000)
@FAST
def test_handshake_lines_parse_or_fail_precisely(line: str) -> None:
    try:
        info = parse_handshake(line, plugin_id="hostile")
    except HandshakeError as exc:
        tried("handshake lines", type(exc).__name__)
        assert exc.plugin_id == "hostile"
        assert str(exc)
        return
    tried("handshake lines", "accepted")
    assert isinstance(info, HandshakeInfo)
    # Accepted only what go-plugin would accept: core 1, app 2, grpc, a usable address.
    parts = line.strip().split("|")
    assert (parts[0], parts[1], parts[4]) == ("1", "2", "grpc")
    assert info.address == parts[3] and info.address
    if info.network is Network.TCP:
        port = info.address.rpartition(":")[2]
        assert port.isascii() and 0 < int(port) < 65536


@given(
    network=st.sampled_from(["unix", "tcp"]),
    port=st.integers(1, 65535),
    path=st.text(string.ascii_letters + string.digits + "/._-", min_size=1, max_size=60),
)
@FAST
def test_valid_handshake_lines_round_trip(network: str, port: int, path: str) -> None:
    address = f"127.0.0.1:{port}" if network == "tcp" else f"/{path}"
    info = parse_handshake(f"1|2|{network}|{address}|grpc\n", plugin_id="good")
    tried("handshake lines (valid)", "accepted")
    assert (info.network, info.address, info.protocol) == (Network(network), address, "grpc")


# -- plugin.json -------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
PLUGIN_KEYS = (
    "id",
    "type",
    "name",
    "backend",
    "executable",
    "info",
    "routes",
    "includes",
    "dependencies",
    "alerting",
)
plugin_docs = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(
            st.sampled_from(["ok-id", "", " ", "../../etc", "a/b", "id\0", "é"]), json_value
        ),
        "type": st.one_of(st.sampled_from(["datasource", "app", "panel", "renderer"]), json_value),
        "name": json_value,
        "backend": json_value,
        "executable": st.one_of(
            st.sampled_from(["gpx_x", "../gpx_x", "/bin/sh", "", "gpx_x\0", "a/../../b"]),
            json_value,
        ),
        "info": st.one_of(st.fixed_dictionaries({"version": json_value}), json_value),
        "routes": json_value,
        "includes": json_value,
        "dependencies": json_value,
    },
)


VALID_PLUGIN = {
    "id": "ok-id",
    "type": "datasource",
    "name": "OK",
    "info": {"version": "1.0.0"},
    "backend": True,
    "executable": "gpx_x",
}
# A valid plugin.json with a few of its fields replaced by (or merged with) hostile ones.
nearly_valid_docs = plugin_docs.map(lambda hostile: {**VALID_PLUGIN, **hostile})

plugin_json_bytes = st.one_of(
    nearly_valid_docs.map(lambda d: json.dumps(d).encode()),
    plugin_docs.map(lambda d: json.dumps(d).encode()),
    plugin_docs.map(json.dumps).flatmap(mutate).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    json_value.map(lambda v: json.dumps(v).encode()),
)


@given(data=plugin_json_bytes)
@example(data=b"[" * 100_000)
@example(data=b'{"id": "x", "type": "datasource", "name": "x", "info": {"version": "1"}}' * 2)
@example(data=b"\xff\xfe{}")
@example(data=b'{"id": 1e999}')
@FAST
def test_plugin_json_parses_or_fails_precisely(data: bytes) -> None:
    try:
        parsed = parse_plugin_json(data)
    except PluginJSONError as exc:
        tried("plugin.json documents", "PluginJSONError")
        assert str(exc)
        return
    tried("plugin.json documents", "accepted")
    assert isinstance(parsed, PluginJSON)
    assert parsed.id.strip()


@given(doc=nearly_valid_docs | plugin_docs, backend=st.booleans())
@example(doc={**VALID_PLUGIN, "executable": "gpx_x\0"}, backend=True)
@SLOW
def test_discovery_of_hostile_plugin_json_gives_a_load_error(
    doc: dict[str, Any], backend: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A plugins directory whose plugin.json is hostile: discovery returns, with a load error."""
    plugins = tmp_path_factory.mktemp("hostile-plugins")
    directory = plugins / "hostile"
    directory.mkdir()
    (directory / "plugin.json").write_text(json.dumps(doc))
    if backend:
        (directory / "gpx_x_linux_amd64").write_bytes(b"\x7fELF")
    result = discover([plugins], allow_unsigned=frozenset({"ok-id"}))
    outcome = [f"error {e.code}" for e in result.errors] + ["loaded"] * len(result.plugins)
    assert len(outcome) == 1, outcome
    tried("plugin.json via discovery", outcome[0])
    for failure in result.errors:
        assert failure.reason and isinstance(failure.code, LoadErrorCode)
    try:
        parse_plugin_json(json.dumps(doc))
    except PluginJSONError:
        assert [e.code for e in result.errors] == [LoadErrorCode.INVALID_PLUGIN_JSON]


# -- MANIFEST.txt ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_test_key("ed25519")


@pytest.fixture(scope="module")
def signed_plugin(
    key: SigningKey, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    directory = write_plugin(tmp_path_factory.mktemp("signed") / "p", plugin_id="signed-app")
    (directory / "module.js").write_text("export {}\n")
    body = manifest_body(directory, plugin_id="signed-app", version="1.0.0", key_id=key.key_id)
    return directory, body


def _check_manifest(data: bytes, key: SigningKey, directory: Path, kind: str) -> None:
    """read_manifest: a Manifest or a ManifestError; compute_signature: a status with a detail."""
    try:
        read_manifest(data, key.keyring())
        parsed = "parsed"
    except ManifestError as exc:
        parsed = "ManifestError"
        assert str(exc)
    (directory / MANIFEST_NAME).write_bytes(data)
    signature = compute_signature(
        directory, plugin_id="signed-app", plugin_version="1.0.0", keyring=key.keyring()
    )
    assert signature.status in SignatureStatus.__members__.values()
    assert signature.detail
    tried(kind, f"{parsed}/{signature.status}")
    if signature.status is SignatureStatus.VALID:
        # Only a manifest that verifies and covers the directory exactly may be valid.
        manifest = read_manifest(data, key.keyring())
        assert manifest.plugin == "signed-app"


manifest_values = st.one_of(json_value, st.text(FIELD_CHARS, max_size=30))


@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "manifestVersion",
                "signatureType",
                "signedByOrg",
                "signedByOrgName",
                "plugin",
                "version",
                "time",
                "keyId",
                "files",
                "rootUrls",
            ]
        ),
        manifest_values | st.none(),
        max_size=4,
    )
)
@SLOW
def test_signed_hostile_manifest_bodies_give_a_precise_status(
    changes: dict[str, Any], key: SigningKey, signed_plugin: tuple[Path, dict[str, Any]]
) -> None:
    """Well-signed manifests whose JSON fields are hostile (wrong types, missing, odd text)."""
    directory, body = signed_plugin
    hostile = {**body}
    for name, value in changes.items():
        if value is None:
            hostile.pop(name, None)
        else:
            hostile[name] = value
    data = key.clear_sign(json.dumps(hostile).encode())
    _check_manifest(data, key, directory, "MANIFEST.txt signed bodies")


@given(mutation=st.data())
@SLOW
def test_mutated_manifests_give_a_precise_status(
    mutation: st.DataObject, key: SigningKey, signed_plugin: tuple[Path, dict[str, Any]]
) -> None:
    """A valid clear-signed MANIFEST.txt with bytes inserted, removed or replaced."""
    directory, body = signed_plugin
    text = key.clear_sign(json.dumps(body, indent=2).encode()).decode()
    mutated = mutation.draw(mutate(text))
    data = mutated.encode("utf-8", "surrogatepass")
    _check_manifest(data, key, directory, "MANIFEST.txt mutated")


@given(data=st.binary(max_size=600))
@example(data=b"-----BEGIN PGP SIGNED MESSAGE-----\n" * 50)
@example(data=b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n{}\n" + b"\0" * 100)
@SLOW
def test_random_manifests_give_a_precise_status(
    data: bytes, key: SigningKey, signed_plugin: tuple[Path, dict[str, Any]]
) -> None:
    directory, _ = signed_plugin
    _check_manifest(data, key, directory, "MANIFEST.txt random bytes")


def test_deeply_nested_signed_manifest_is_a_precise_error(
    key: SigningKey, signed_plugin: tuple[Path, dict[str, Any]]
) -> None:
    """JSON nested beyond the parser's recursion limit, validly signed: an error, not a crash."""
    directory, _ = signed_plugin
    data = key.clear_sign(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    with pytest.raises(ManifestError, match="nested too deeply"):
        read_manifest(data, key.keyring())
    _check_manifest(data, key, directory, "MANIFEST.txt nested")
