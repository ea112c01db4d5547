"""Token mode: bearer tokens from a kube-apiserver static token file, mapped to org and role."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from bridge.identity import Identity, OrgRole
from bridge.status import StatusError

log = logging.getLogger(__name__)

_MISSING = (-1, -1, -1)


class OrgGrant(BaseModel):
    """The org and role a token-file user or group gets (``auth.users`` values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    org_id: int = Field(default=1, ge=1)
    role: OrgRole = OrgRole.VIEWER
    server_admin: bool = False


GROUP_PREFIX = "group:"


def grant_for(grants: Mapping[str, OrgGrant], login: str, groups: Iterable[str]) -> OrgGrant:
    """The org and role ``auth.users`` gives ``login`` with ``groups`` (token file or certificate).

    The login's own entry wins; otherwise the first group with a grant picks the org and the
    highest role any of the groups grants there applies. Nothing granted: role None in org 1.
    A login that itself reads ``group:<name>`` never takes that group's grant as its own.
    """
    own = None if login.startswith(GROUP_PREFIX) else grants.get(login)
    if own is not None:
        return own
    matches = [g for g in (grants.get(f"{GROUP_PREFIX}{name}") for name in groups) if g]
    if not matches:
        return OrgGrant(org_id=1, role=OrgRole.NONE)
    org_id = matches[0].org_id
    same_org = [g for g in matches if g.org_id == org_id]
    return OrgGrant(
        org_id=org_id,
        role=max(g.role for g in same_org),
        server_admin=any(g.server_admin for g in same_org),
    )


class TokenFileError(ValueError):
    """The static token file cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TokenUser:
    """One record of the token file, without its token."""

    name: str
    uid: str
    groups: tuple[str, ...]


def parse_token_file(text: str, *, path: Path | str = "<token file>") -> dict[bytes, TokenUser]:
    """Parse kube-apiserver's ``--token-auth-file`` CSV: ``token,user,uid[,"group1,group2"]``.

    As kube-apiserver does: at least three columns, blank lines skipped, a record with an
    empty token skipped with a warning, a duplicated token keeps the later record, columns
    after the fourth ignored. The result is keyed by the SHA-256 digest of each token; the
    tokens themselves are not kept.
    """
    users: dict[bytes, TokenUser] = {}
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for record in reader:
            if not record:
                continue
            line = reader.line_num
            if len(record) < 3:
                raise TokenFileError(
                    f"{path}:{line}: a token record needs at least 3 columns "
                    f"(token, user name, user uid), found {len(record)}"
                )
            token, name, uid = record[0], record[1], record[2]
            if not token:
                log.warning("%s:%d: empty token, record skipped", path, line)
                continue
            digest = hashlib.sha256(token.encode()).digest()
            if digest in users:
                log.warning("%s:%d: duplicate token, the later record wins", path, line)
            groups = tuple(g for g in record[3].split(",") if g) if len(record) > 3 else ()
            users[digest] = TokenUser(name=name, uid=uid, groups=groups)
    except csv.Error as exc:
        raise TokenFileError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from None
    return users


class TokenAuthenticator:
    """Bearer tokens from a static token file, mapped to org and role by ``grants``.

    ``grants`` maps a user name, or ``group:<name>``, to an ``OrgGrant``. A user's own entry
    wins. Otherwise the token's groups are tried in the order the file lists them: the first
    with a grant picks the org, and the role is the highest that any of the token's groups
    grants in that org (``server_admin`` likewise). A token without any grant is still a
    valid caller, with role ``None`` in org 1.

    The file is re-read when it changes (checked at most every ``reload_interval`` seconds,
    on the next request); an edit that breaks it keeps the previous tokens, logged once.
    Tokens are compared as SHA-256 digests, in constant time.
    """

    credentials_hint = "Authorization: Bearer <token from the token file>"

    def __init__(
        self,
        token_file: Path,
        *,
        grants: Mapping[str, OrgGrant],
        reload_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = token_file
        self._grants = dict(grants)
        self._interval = reload_interval
        self._clock = clock
        self._stamp = self._file_stamp()
        self._users = self._read()
        self._checked = clock()
        self._failed_stamp: tuple[int, int, int] | None = None
        if token_file.stat().st_mode & 0o077:
            log.warning("token file %s is readable by other users; chmod 600 it", token_file)

    @property
    def token_count(self) -> int:
        return len(self._users)

    async def authenticate(self, request: web.Request) -> Identity | None:
        return self.authenticate_headers(request.headers)

    def authenticate_headers(self, headers: Mapping[str, str]) -> Identity | None:
        authorization = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        if authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise StatusError(401, f"token mode accepts only {self.credentials_hint}")
        self._maybe_reload()
        user = self._find(token)
        if user is None:
            raise StatusError(401, "the bearer token is not in the token file")
        grant = grant_for(self._grants, user.name, user.groups)
        return Identity(
            login=user.name,
            name=user.name,
            email="",
            org_id=grant.org_id,
            role=grant.role,
            is_server_admin=grant.server_admin,
            uid=user.uid,
            auth_method="token",
        )

    def _find(self, token: str) -> TokenUser | None:
        # Every known digest is compared in constant time, with no early exit on a match.
        digest = hashlib.sha256(token.encode()).digest()
        found: TokenUser | None = None
        for known, user in self._users.items():
            if hmac.compare_digest(known, digest):
                found = user
        return found

    def _file_stamp(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise TokenFileError(f"cannot read token file {self._path}: {exc.strerror}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> dict[bytes, TokenUser]:
        try:
            text = self._path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"cannot read token file {self._path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise TokenFileError(f"token file {self._path} is not UTF-8") from None
        return parse_token_file(text, path=self._path)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < self._interval:
            return
        self._checked = now
        try:
            stamp = self._file_stamp()
        except TokenFileError as exc:
            self._keep_previous(exc, _MISSING)
            return
        if stamp in (self._stamp, self._failed_stamp):
            return
        try:
            users = self._read()
        except TokenFileError as exc:
            self._keep_previous(exc, stamp)
            return
        self._users, self._stamp, self._failed_stamp = users, stamp, None
        log.info("reloaded token file %s: %d tokens", self._path, len(users))

    def _keep_previous(self, error: TokenFileError, stamp: tuple[int, int, int]) -> None:
        # Logged once per broken version of the file, not on every request.
        if self._failed_stamp != stamp:
            log.error("%s; keeping the %d tokens loaded before", error, len(self._users))
        self._failed_stamp = stamp
