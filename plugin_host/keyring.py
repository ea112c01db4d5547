"""The OpenPGP public keys that plugin MANIFEST.txt signatures are checked against."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pysequoia
from pysequoia.packet import PacketPile, Tag

GRAFANA_KEY_ID = "7e4d0c6a708866e7"
_GRAFANA_KEY_RESOURCE = f"keys/grafana-{GRAFANA_KEY_ID}.asc"
_SECRET_TAGS = (Tag.SecretKey, Tag.SecretSubkey)  # pysequoia's Tag is not hashable


class KeyRingError(ValueError):
    """A configured public key cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One OpenPGP certificate and the ids a signature may name it by."""

    cert: pysequoia.Cert
    fingerprint: str
    key_ids: frozenset[str]  # 16-hex ids of the primary key and every subkey
    fingerprints: frozenset[str]  # full fingerprints of the primary key and every subkey
    user_ids: tuple[str, ...]
    source: str

    @property
    def key_id(self) -> str:
        """The primary key's id, the form MANIFEST.txt uses in ``keyId``."""
        return key_id_of(self.fingerprint)

    def is_named_by(self, ident: str) -> bool:
        """Whether a key id or fingerprint (any case) names this key or one of its subkeys."""
        ident = ident.lower()
        return ident in self.key_ids or ident in self.fingerprints

    @classmethod
    def from_cert(cls, cert: pysequoia.Cert, *, source: str) -> PublicKey:
        fingerprints = {
            packet.fingerprint
            for packet in PacketPile.from_bytes(bytes(cert))
            if packet.fingerprint is not None
        }
        return cls(
            cert=cert,
            fingerprint=cert.fingerprint.lower(),
            key_ids=frozenset(key_id_of(fpr) for fpr in fingerprints),
            fingerprints=frozenset(fpr.lower() for fpr in fingerprints),
            user_ids=tuple(str(uid) for uid in cert.user_ids),
            source=source,
        )


class KeyRing:
    """An immutable set of public keys, looked up by key id or fingerprint."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys: tuple[PublicKey, ...] = tuple(keys)

    @classmethod
    def load(cls, key_files: Sequence[Path] = (), *, include_grafana_key: bool = True) -> KeyRing:
        """Grafana's built-in key (unless told otherwise) plus every key in ``key_files``."""
        keys: list[PublicKey] = []
        if include_grafana_key:
            keys.extend(parse_armored(grafana_public_key(), source="built-in Grafana key"))
        for path in key_files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise KeyRingError(f"cannot read public key file {path}: {exc.strerror}") from exc
            keys.extend(parse_armored(data, source=str(path)))
        return cls(keys)

    def __iter__(self) -> Iterator[PublicKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing({', '.join(key.key_id for key in self._keys)})"

    def find(self, ident: str) -> PublicKey | None:
        """The key a key id or fingerprint names, or None."""
        for key in self._keys:
            if key.is_named_by(ident):
                return key
        return None

    def named_by_any(self, idents: Iterable[str]) -> list[PublicKey]:
        wanted = list(idents)
        return [key for key in self._keys if any(key.is_named_by(i) for i in wanted)]

    def merged(self, other: KeyRing) -> KeyRing:
        return KeyRing((*self._keys, *other._keys))


def grafana_public_key() -> bytes:
    """The armored public key (id 7e4d0c6a708866e7) Grafana checks grafana.com signatures with."""
    resource = resources.files("plugin_host").joinpath(_GRAFANA_KEY_RESOURCE)
    try:
        return resource.read_bytes()
    except OSError as exc:
        # Only a packaging mistake gets here; say so rather than silently trusting nothing.
        raise KeyRingError(
            f"the built-in Grafana public key ({_GRAFANA_KEY_RESOURCE}) is missing from the "
            "plugin_host package"
        ) from exc


def parse_armored(data: bytes | str, *, source: str) -> list[PublicKey]:
    """Every public certificate in an armored (or binary) key block."""
    raw = data.encode() if isinstance(data, str) else data
    if not raw.strip():
        raise KeyRingError(f"{source} holds no OpenPGP public key")
    # Checked before parsing certificates: a secret key must not even be loaded.
    private = f"{source} holds a private key; configure the public key only"
    if b"PRIVATE KEY BLOCK" in raw:
        raise KeyRingError(private)
    try:
        tags = [packet.tag for packet in PacketPile.from_bytes(raw)]
    except (RuntimeError, ValueError) as exc:
        raise KeyRingError(f"{source} is not an OpenPGP key: {sequoia_message(exc)}") from exc
    if any(tag in _SECRET_TAGS for tag in tags):
        raise KeyRingError(private)
    try:
        certs = pysequoia.Cert.split_bytes(raw)
    except (RuntimeError, ValueError) as exc:
        raise KeyRingError(
            f"{source} is not an OpenPGP public key: {sequoia_message(exc)}"
        ) from exc
    if not certs:
        raise KeyRingError(f"{source} holds no OpenPGP public key")
    return [PublicKey.from_cert(cert, source=source) for cert in certs]


def key_id_of(fingerprint: str) -> str:
    """The 16-hex key id of a fingerprint (or of a key id, which is returned as is)."""
    # A v4 key id is the fingerprint's low 64 bits; a v6 key id is its high 64 bits.
    fpr = fingerprint.lower()
    return fpr[:16] if len(fpr) == 64 else fpr[-16:]


def sequoia_message(exc: BaseException) -> str:
    # pysequoia appends a Rust backtrace when RUST_BACKTRACE is set; keep the message only.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
