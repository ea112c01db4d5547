"""Org roles, identities and Grafana's namespace ↔ org rules."""

from __future__ import annotations

import pytest

from bridge.identity import Identity, OrgRole, namespace_for_org, parse_namespace
from bridge.status import StatusError


@pytest.mark.parametrize(
    ("namespace", "org_id"),
    [
        ("default", 1),
        ("org-2", 2),
        ("org-42", 42),
        ("org-9223372036854775807", 2**63 - 1),
        ("stacks-1", 1),
        ("stacks-123456", 1),
        ("stack-7", 1),  # deprecated spelling, still accepted upstream
    ],
)
def test_namespace_to_org(namespace: str, org_id: int) -> None:
    assert parse_namespace(namespace) == org_id


@pytest.mark.parametrize(
    ("namespace", "why"),
    [
        ("org-1", "'default' namespace"),
        ("org-0", "expected default"),
        ("org-02", "expected default"),
        ("org-+2", "expected default"),
        ("org-2_0", "expected default"),
        ("org-", "expected default"),
        ("org-x", "expected default"),
        ("org-9223372036854775808", "out of range"),
        ("stacks-0", "expected default"),
        ("stacks-", "expected default"),
        ("stacks-abc", "expected default"),
        ("Default", "expected default"),
        ("kube-system", "expected default"),
        ("", "expected default"),
        ("org-2 ", "expected default"),
        ("a" * 64, "expected default"),
    ],
)
def test_invalid_namespaces_are_400(namespace: str, why: str) -> None:
    with pytest.raises(StatusError) as caught:
        parse_namespace(namespace)
    assert caught.value.code == 400
    assert why in caught.value.message


@pytest.mark.parametrize(("org_id", "namespace"), [(1, "default"), (2, "org-2"), (77, "org-77")])
def test_org_to_namespace_round_trips(org_id: int, namespace: str) -> None:
    assert namespace_for_org(org_id) == namespace
    assert parse_namespace(namespace) == org_id


@pytest.mark.parametrize("org_id", [0, -1])
def test_org_to_namespace_rejects_non_positive(org_id: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        namespace_for_org(org_id)


def test_roles_are_ordered() -> None:
    assert OrgRole.NONE < OrgRole.VIEWER < OrgRole.EDITOR < OrgRole.ADMIN
    assert OrgRole.ADMIN >= OrgRole.EDITOR
    assert OrgRole.EDITOR >= OrgRole.EDITOR
    assert not OrgRole.VIEWER >= OrgRole.EDITOR
    assert OrgRole.VIEWER <= OrgRole.VIEWER
    assert max(OrgRole.VIEWER, OrgRole.ADMIN, OrgRole.EDITOR) is OrgRole.ADMIN
    # Not alphabetical, which is what a plain string enum would compare.
    assert sorted([OrgRole.ADMIN, OrgRole.NONE, OrgRole.VIEWER, OrgRole.EDITOR]) == [
        OrgRole.NONE,
        OrgRole.VIEWER,
        OrgRole.EDITOR,
        OrgRole.ADMIN,
    ]


def test_roles_compare_only_with_roles() -> None:
    with pytest.raises(TypeError):
        _ = OrgRole.ADMIN < 3


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("Admin", OrgRole.ADMIN),
        ("admin", OrgRole.ADMIN),
        ("EDITOR", OrgRole.EDITOR),
        ("Viewer", OrgRole.VIEWER),
        ("None", OrgRole.NONE),
    ],
)
def test_role_from_text(text: str, role: OrgRole) -> None:
    assert OrgRole(text) is role
    assert str(role) == role.value


def test_unknown_role_text() -> None:
    with pytest.raises(ValueError, match="Owner"):
        OrgRole("Owner")


def test_identity_is_frozen_with_defaults() -> None:
    who = Identity(login="ann", name="Ann", email="ann@example.com", org_id=3, role=OrgRole.EDITOR)
    assert (who.is_server_admin, who.uid, who.auth_method) == (False, "", "")
    assert who.namespace == "org-3"
    assert not who.is_anonymous
    with pytest.raises(AttributeError):
        who.org_id = 4  # type: ignore[misc]
    anonymous = Identity(
        login="", name="", email="", org_id=1, role=OrgRole.VIEWER, auth_method="anonymous"
    )
    assert anonymous.is_anonymous
    assert anonymous.namespace == "default"
