"""The SDK's query body: parsing, defaults, times and every 400."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.query import parse_query_body, parse_time
from bridge.status import StatusError

NOW = datetime(2026, 3, 15, 12, 30, 45, 500000, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_defaults_and_plugin_specific_keys_are_kept() -> None:
    parsed = parse_query_body(
        body(
            {
                "from": "now-1h",
                "to": "now",
                "queries": [
                    {
                        "refId": "A",
                        "datasource": {"type": "prometheus", "uid": "p1"},
                        "expr": "up",
                        "legendFormat": "__auto",
                    }
                ],
            }
        ),
        now=NOW,
    )
    assert parsed.datasource is not None and (parsed.datasource.type, parsed.datasource.uid) == (
        "prometheus",
        "p1",
    )
    [q] = parsed.queries
    assert q.refId == "A" and q.maxDataPoints == 100 and q.intervalMS == 1000
    assert q.timeRange.toEpochMS == NOW_MS and q.timeRange.fromEpochMS == NOW_MS - 3_600_000
    model = json.loads(q.json)
    assert model["expr"] == "up" and model["legendFormat"] == "__auto" and "timeRange" not in model


def test_per_query_time_range_and_numbers() -> None:
    parsed = parse_query_body(
        body(
            {
                "from": "1700000000000",
                "to": "2023-11-14T22:16:40Z",
                "queries": [
                    {
                        "refId": "A",
                        "maxDataPoints": "969",
                        "intervalMs": 15000,
                        "queryType": "range",
                    },
                    {"refId": "B", "timeRange": {"from": "now-1d/d", "to": "now/d"}},
                ],
            }
        ),
        now=NOW,
    )
    a, b = parsed.queries
    assert (a.timeRange.fromEpochMS, a.timeRange.toEpochMS) == (
        1_700_000_000_000,
        1_700_000_200_000,
    )
    assert a.maxDataPoints == 969 and a.intervalMS == 15000 and a.queryType == "range"
    midnight = int(datetime(2026, 3, 15, tzinfo=UTC).timestamp() * 1000)
    assert (b.timeRange.fromEpochMS, b.timeRange.toEpochMS) == (midnight - 86_400_000, midnight)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("now", NOW_MS),
        ("now-5m", NOW_MS - 300_000),
        ("now+1h", NOW_MS + 3_600_000),
        ("now-1M", int(datetime(2026, 2, 15, 12, 30, 45, 500000, tzinfo=UTC).timestamp() * 1000)),
        ("now-1y", int(datetime(2025, 3, 15, 12, 30, 45, 500000, tzinfo=UTC).timestamp() * 1000)),
        ("now/h", int(datetime(2026, 3, 15, 12, tzinfo=UTC).timestamp() * 1000)),
        ("now/w", int(datetime(2026, 3, 9, tzinfo=UTC).timestamp() * 1000)),
        (1700000000000, 1700000000000),
        (
            "2024-01-01T00:00:00+02:00",
            int(datetime(2023, 12, 31, 22, tzinfo=UTC).timestamp() * 1000),
        ),
    ],
)
def test_time_forms(raw: object, expected: int) -> None:
    assert parse_time(raw, NOW, key="from") == expected


BAD: list[tuple[bytes, str]] = [
    (b"{", "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2"),
    (b"\xff", "not UTF-8"),
    (b"[]", "must be a JSON object"),
    (body({"queries": []}), '"queries" must be a non-empty list'),
    (body({"from": "now-1h", "to": "now", "queries": [1]}), "queries[0] must be a JSON object"),
    (body({"from": "yesterday", "to": "now", "queries": [{}]}), "from 'yesterday' is not a time"),
    (body({"from": "now", "to": "now-1h", "queries": [{}]}), "is after"),
    (body({"queries": [{"refId": "A"}]}), "has no time range"),
    (
        body({"from": "now-1h", "to": "now", "queries": [{"refId": "A"}, {"refId": "A"}]}),
        "refId 'A' is used by another query",
    ),
    (
        body({"from": "now-1h", "to": "now", "queries": [{"refId": "A", "maxDataPoints": -1}]}),
        "maxDataPoints must be a non-negative integer",
    ),
    (
        body({"from": "now-1h", "to": "now", "queries": [{"refId": "A", "intervalMs": "fast"}]}),
        "intervalMs must be a non-negative number",
    ),
    (
        body({"from": "now-1h", "to": "now", "queries": [{"refId": "A", "datasource": 5}]}),
        "datasource must be an object",
    ),
    (
        body(
            {
                "from": "now-1h",
                "to": "now",
                "queries": [
                    {"refId": "A", "datasource": {"type": "a", "uid": "1"}},
                    {"refId": "B", "datasource": {"type": "b", "uid": "1"}},
                ],
            }
        ),
        "all queries must use the same datasource",
    ),
    (
        body(
            {
                "from": "now-1h",
                "to": "now",
                "queries": [
                    {"refId": "A", "datasource": {"type": "a", "uid": "1"}},
                    {"refId": "B", "datasource": {"type": "a", "uid": "2"}},
                ],
            }
        ),
        "queries[1].datasource.uid '2' differs",
    ),
]


@pytest.mark.parametrize(("raw", "fragment"), BAD)
def test_bad_bodies_are_400_with_a_reason(raw: bytes, fragment: str) -> None:
    with pytest.raises(StatusError) as info:
        parse_query_body(raw, now=NOW)
    assert info.value.code == 400
    assert fragment in info.value.message
