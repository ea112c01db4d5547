"""bridge/hops.py: the hop-by-hop rule all three hops share, and Go's header-name spelling.

The same rule is exercised end to end through real processes in test_delegate.py (Grafana),
test_front_door_routes.py (a Go and a Python plugin's CallResource) and
test_datasource_proxy.py (a datasource).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.hops import HOP_BY_HOP, connection_tokens, end_to_end, go_header_name


@pytest.mark.parametrize(
    ("sent", "go"),
    [
        ("content-type", "Content-Type"),
        ("X-FORWARDED-FOR", "X-Forwarded-For"),
        ("www-AUTHENTICATE", "Www-Authenticate"),
        ("x_under_score", "X_under_score"),
        ("x--double", "X--Double"),
        ("-leading", "-Leading"),
        ("te", "Te"),
        ("with space", "with space"),
        ("colon:", "colon:"),
        ("ünïcode", "ünïcode"),
        ("", ""),
    ],
)
def test_go_header_name_spells_names_as_net_http_does(sent: str, go: str) -> None:
    assert go_header_name(sent) == go


def test_connection_tokens_are_lower_case_and_from_every_connection_header() -> None:
    items = [("Connection", "Keep-Alive, X-One"), ("connection", " x-TWO ,,"), ("X-One", "1")]
    assert connection_tokens(items) == {"keep-alive", "x-one", "x-two"}


def test_end_to_end_drops_hop_by_hop_named_proxy_and_extra_headers_keeping_order() -> None:
    items = [
        ("Accept", "a"),
        ("Connection", "close, X-Named"),
        ("x-named", "dropped"),
        ("Transfer-Encoding", "chunked"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Anything", "y"),
        ("Cookie", "c"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Keep", "1"),
        ("accept", "b"),
    ]
    kept = end_to_end(items, drop={"cookie"}, drop_prefixes=("x-forwarded-",))
    assert kept == [("Accept", "a"), ("X-Keep", "1"), ("accept", "b")]


header_name = st.sampled_from(
    ["Connection", "connection", "Keep-Alive", "TE", "Upgrade", "Proxy-X", "X-A", "x-b", "Accept"]
)
header_value = st.sampled_from(["x-a", "X-B, accept", "close", "1", ""])


@given(st.lists(st.tuples(header_name, header_value), max_size=12))
def test_end_to_end_keeps_every_end_to_end_header_and_nothing_else(
    items: list[tuple[str, str]],
) -> None:
    per_connection = HOP_BY_HOP | connection_tokens(items)
    kept = end_to_end(items)
    remaining = iter(items)
    assert all(pair in remaining for pair in kept), "not a subsequence of what was sent"
    for name, value in items:
        key = name.lower()
        hop = key in per_connection or key.startswith("proxy-")
        assert ((name, value) in kept) is not hop, (name, value, kept)
