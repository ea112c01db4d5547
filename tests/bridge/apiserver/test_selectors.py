"""Label and field selectors: Kubernetes' syntax, its matching rules, and its errors."""

from __future__ import annotations

import pytest

from bridge.apiserver.selectors import (
    Selection,
    parse_field_selector,
    parse_label_selector,
)
from bridge.status import StatusError

LABELS = {"team": "a", "tier": "gold", "size": "7", "app.kubernetes.io/name": "x"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("team=a", True),
        ("team==a", True),
        ("team=b", False),
        ("team!=b", True),
        ("missing!=b", True),  # != also selects objects without the label
        ("team!=a", False),
        ("team in (a, b)", True),
        ("team in (b,c)", False),
        ("team notin (b,c)", True),
        ("missing notin (b)", True),
        ("team notin (a)", False),
        ("team", True),
        ("missing", False),
        ("!missing", True),
        ("!team", False),
        ("size>6", True),
        ("size>7", False),
        ("size<8", True),
        ("team>1", False),  # not a number: never matches
        ("team=a,tier=gold", True),
        ("team=a, tier=silver", False),
        ("app.kubernetes.io/name=x", True),
        ("missing=", False),
        ("team in (a),!missing,size", True),
    ],
)
def test_label_selector_matching(selector: str, matches: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is matches


def test_empty_value_matches_empty_label() -> None:
    assert parse_label_selector("blank=").matches({"blank": ""})


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("team in a", "expected: '('"),
        ("team in (a", "expected: ',' or ')'"),
        ("=a", "expected: identifier"),
        ("team=a,", "expected: identifier"),
        ("team a", "expected: one of"),
        ("size>x", "expected: an integer"),
        ("team=a b", "expected: ','"),
        ("Bad Key!=x", "expected: one of"),
        ("-bad=x", "invalid label key"),
        ("team=-x-", "invalid label value"),
    ],
)
def test_label_selector_errors(selector: str, message: str) -> None:
    with pytest.raises(StatusError) as caught:
        parse_label_selector(selector)
    assert caught.value.code == 400
    assert message in caught.value.message


OBJECT = {"metadata": {"name": "v0alpha1.a.grafana.app", "labels": {"team": "a"}}}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("metadata.name=v0alpha1.a.grafana.app", True),
        ("metadata.name==v0alpha1.a.grafana.app", True),
        ("metadata.name!=v0alpha1.a.grafana.app", False),
        ("metadata.name=other", False),
        ("metadata.namespace=", True),  # cluster-scoped: the namespace is empty
        ("metadata.namespace=default", False),
        ("metadata.name=v0alpha1.a.grafana.app,metadata.namespace!=x", True),
        (r"metadata.name=a\,b", False),
    ],
)
def test_field_selector_matching(selector: str, matches: bool) -> None:
    assert parse_field_selector(selector).matches(OBJECT) is matches


def test_field_selector_escapes() -> None:
    selector = parse_field_selector(r"metadata.name=a\,b\=c\\d")
    assert selector.matches({"metadata": {"name": "a,b=c\\d"}})
    assert selector.exact_name() == "a,b=c\\d"


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("spec.group=x", '"spec.group" is not a known field selector'),
        ("metadata.name", "has no =, == or != operator"),
        ("metadata.name=x\\", "ends with a lone"),
    ],
)
def test_field_selector_errors(selector: str, message: str) -> None:
    with pytest.raises(StatusError) as caught:
        parse_field_selector(selector)
    assert caught.value.code == 400
    assert message in caught.value.message


def test_selection_combines_both() -> None:
    both = Selection(parse_label_selector("team=a"), parse_field_selector("metadata.name!=z"))
    assert both.matches(OBJECT)
    assert not both.everything
    assert Selection().everything
