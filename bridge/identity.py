"""Who a request runs as: the caller's identity, org role, and the namespace ↔ org mapping."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from bridge.status import StatusError

# Kubernetes namespaces are at most 63 characters; Grafana's org ids are int64.
_MAX_NAMESPACE = 63
_MAX_ID = 2**63 - 1
# Canonical positive integers only: "org-02", "org-+2" or "org-2_0" would give a second name
# for the same org, which breaks the one-org-one-namespace rule everything else relies on.
_POSITIVE = r"[1-9][0-9]{0,18}"
_ORG = re.compile(rf"org-({_POSITIVE})")
_STACK = re.compile(rf"stacks?-({_POSITIVE})")
_VALID_FORMS = "default (org 1), org-<N> for N ≥ 2, or stacks-<N>"


class OrgRole(StrEnum):
    """A Grafana org role, as Grafana spells it; ordered so ``role >= OrgRole.EDITOR`` works."""

    NONE = "None"
    VIEWER = "Viewer"
    EDITOR = "Editor"
    ADMIN = "Admin"

    @classmethod
    def _missing_(cls, value: object) -> OrgRole | None:
        # Config files and Grafana's own APIs are not consistent about case ("admin", "Admin").
        if isinstance(value, str):
            for role in cls:
                if role.value.lower() == value.strip().lower():
                    return role
        return None

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, OrgRole):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, OrgRole):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, OrgRole):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, OrgRole):
            return NotImplemented
        return self.rank >= other.rank


_RANKS = {OrgRole.NONE: 0, OrgRole.VIEWER: 1, OrgRole.EDITOR: 2, OrgRole.ADMIN: 3}


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated caller, taken from the current request only.

    ``org_id`` is the org the request runs in (Grafana's "current org"), ``role`` the caller's
    role there. ``auth_method`` says how the caller proved who they are: ``session``,
    ``basic``, ``bearer``, ``service_account`` (grafana mode), ``token`` or ``anonymous``.
    """

    login: str
    name: str
    email: str
    org_id: int
    role: OrgRole
    is_server_admin: bool = False
    uid: str = ""
    auth_method: str = ""

    @property
    def is_anonymous(self) -> bool:
        return self.auth_method == "anonymous"

    @property
    def namespace(self) -> str:
        """The namespace of the caller's org."""
        return namespace_for_org(self.org_id)


def parse_namespace(namespace: str) -> int:
    """The org id a Kubernetes namespace names, by Grafana's (authlib's) rules.

    ``default`` is org 1, ``org-<N>`` is org N (N ≥ 2; ``org-1`` is refused because org 1 is
    ``default``), and ``stacks-<N>`` (or the deprecated ``stack-<N>``) is a Grafana Cloud stack,
    which always runs as org 1. Anything else raises ``StatusError(400)``: upstream maps it to
    "no org" and denies with 403, but a namespace that cannot name an org is a malformed
    request, not a permission problem, and 400 tells the caller which forms are valid.
    Non-canonical numbers (``org-02``) are refused for the same reason as ``org-1``: every org
    has exactly one namespace.
    """
    if namespace == "default":
        return 1
    if not namespace or len(namespace) > _MAX_NAMESPACE:
        raise StatusError(400, f"invalid namespace {namespace!r}: expected {_VALID_FORMS}")
    if match := _ORG.fullmatch(namespace):
        org_id = int(match.group(1))
        if org_id == 1:
            raise StatusError(400, "invalid namespace 'org-1': org 1 is the 'default' namespace")
        if org_id > _MAX_ID:
            raise StatusError(400, f"invalid namespace {namespace!r}: org id out of range")
        return org_id
    if match := _STACK.fullmatch(namespace):
        if int(match.group(1)) > _MAX_ID:
            raise StatusError(400, f"invalid namespace {namespace!r}: stack id out of range")
        return 1
    raise StatusError(400, f"invalid namespace {namespace!r}: expected {_VALID_FORMS}")


def namespace_for_org(org_id: int) -> str:
    """The namespace Grafana gives an org: ``default`` for org 1, ``org-<N>`` otherwise."""
    if org_id < 1:
        raise ValueError(f"org id must be positive, got {org_id}")
    return "default" if org_id == 1 else f"org-{org_id}"
