"""The SDK's HTTP query format (``/api/ds/query`` style) turned into pluginv2 ``DataQuery``s."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bridge.status import StatusError
from protos.pluginv2 import backend_pb2 as pb

DEFAULT_MAX_DATA_POINTS = 100
DEFAULT_INTERVAL_MS = 1000
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Keys the SDK knows; every other key of a query stays in its JSON for the plugin.
_TIME_RANGE_KEY = "timeRange"
_RELATIVE = re.compile(
    r"^now(?:(?P<sign>[+-])(?P<amount>\d+)(?P<unit>ms|s|m|h|d|w|M|y))?(?:/(?P<round>[smhdwMy]))?$"
)
_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}


@dataclass(frozen=True, slots=True)
class DatasourceRef:
    type: str
    uid: str


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    datasource: DatasourceRef | None
    queries: tuple[pb.DataQuery, ...]


def bad_request(message: str) -> StatusError:
    return StatusError(400, message)


def parse_query_body(body: bytes, *, now: datetime | None = None) -> ParsedQuery:
    """Decode and check a query request body; every problem is a 400 with a precise message."""
    try:
        doc = json.loads(body, parse_constant=_not_json)
    except UnicodeDecodeError:
        raise bad_request("request body is not UTF-8 text") from None
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(doc, dict):
        raise bad_request('request body must be a JSON object with "queries"')
    queries = doc.get("queries")
    if not isinstance(queries, list) or not queries:
        raise bad_request('"queries" must be a non-empty list')
    current = now or datetime.now(UTC)
    default_range = _time_range(doc.get("from"), doc.get("to"), current, where="")

    datasource: DatasourceRef | None = None
    built: list[pb.DataQuery] = []
    seen_refs: set[str] = set()
    for i, query in enumerate(queries):
        where = f"queries[{i}]"
        if not isinstance(query, dict):
            raise bad_request(f"{where} must be a JSON object")
        ref = _datasource_ref(query.get("datasource"), where)
        if i == 0:
            datasource = ref
        elif ref is not None and datasource is not None:
            if ref.type and ref.type != datasource.type:
                raise bad_request(
                    f"{where}.datasource.type {ref.type!r} differs from queries[0]'s "
                    f"{datasource.type!r}; all queries must use the same datasource"
                )
            if ref.uid != datasource.uid:
                raise bad_request(
                    f"{where}.datasource.uid {ref.uid!r} differs from queries[0]'s "
                    f"{datasource.uid!r}; all queries must use the same datasource"
                )
        ref_id = query.get("refId", "A" if len(queries) == 1 else "")
        if not isinstance(ref_id, str) or not ref_id:
            raise bad_request(f"{where}.refId must be a non-empty string")
        if ref_id in seen_refs:
            raise bad_request(f"{where}.refId {ref_id!r} is used by another query")
        seen_refs.add(ref_id)
        time_range = default_range
        per_query = query.get(_TIME_RANGE_KEY)
        if per_query is not None:
            if not isinstance(per_query, dict):
                raise bad_request(f"{where}.timeRange must be an object with from and to")
            time_range = _time_range(
                per_query.get("from"), per_query.get("to"), current, where=f"{where}.timeRange."
            )
        if time_range is None:
            raise bad_request(
                f'{where} has no time range: set "from" and "to" on the request or the query'
            )
        model = {k: v for k, v in query.items() if k != _TIME_RANGE_KEY}
        built.append(
            pb.DataQuery(
                refId=ref_id,
                maxDataPoints=_max_data_points(query.get("maxDataPoints"), where),
                intervalMS=_interval_ms(query.get("intervalMs"), where),
                timeRange=time_range,
                json=json.dumps(model, separators=(",", ":"), sort_keys=True).encode(),
                queryType=_optional_string(query.get("queryType"), f"{where}.queryType"),
            )
        )
    return ParsedQuery(datasource=datasource, queries=tuple(built))


def _not_json(name: str) -> object:
    # Python reads NaN and Infinity; JSON (and Go, and so the plugin) does not.
    raise bad_request(f"request body is not valid JSON: {name} is not a JSON value")


def _int64(value: int, what: str) -> int:
    """``value`` if it fits the int64 fields of pluginv2 messages, else a 400."""
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise bad_request(f"{what} is out of range")
    return value


def _datasource_ref(raw: object, where: str) -> DatasourceRef | None:
    if raw is None:
        return None
    if isinstance(raw, str):  # a bare string is a uid, as the SDK accepts
        return DatasourceRef(type="", uid=raw)
    if not isinstance(raw, Mapping):
        raise bad_request(f"{where}.datasource must be an object with type and uid")
    ds_type, uid = raw.get("type", ""), raw.get("uid", "")
    if not isinstance(ds_type, str) or not isinstance(uid, str):
        raise bad_request(f"{where}.datasource.type and .uid must be strings")
    return DatasourceRef(type=ds_type, uid=uid)


def _max_data_points(raw: object, where: str) -> int:
    if raw is None or raw in ("", 0):
        return DEFAULT_MAX_DATA_POINTS
    try:
        value = int(raw) if isinstance(raw, (int, str)) and not isinstance(raw, bool) else None
    except ValueError:
        value = None
    if isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    if value is None or value < 0:
        raise bad_request(f"{where}.maxDataPoints must be a non-negative integer, got {raw!r}")
    return _int64(value, f"{where}.maxDataPoints") or DEFAULT_MAX_DATA_POINTS


def _interval_ms(raw: object, where: str) -> int:
    if raw is None or raw == "":
        return DEFAULT_INTERVAL_MS
    if (
        isinstance(raw, bool)
        or not isinstance(raw, (int, float))
        or not math.isfinite(raw)
        or raw < 0
    ):
        raise bad_request(f"{where}.intervalMs must be a non-negative number, got {raw!r}")
    return _int64(int(raw), f"{where}.intervalMs") if raw > 0 else DEFAULT_INTERVAL_MS


def _optional_string(raw: object, where: str) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise bad_request(f"{where} must be a string")
    return raw


def _time_range(start: object, end: object, now: datetime, *, where: str) -> pb.TimeRange | None:
    if start in (None, "") and end in (None, ""):
        return None
    from_ms = parse_time(start if start not in (None, "") else "now-6h", now, key=f"{where}from")
    to_ms = parse_time(end if end not in (None, "") else "now", now, key=f"{where}to")
    if from_ms > to_ms:
        raise bad_request(f"{where}from ({start}) is after {where}to ({end})")
    return pb.TimeRange(fromEpochMS=from_ms, toEpochMS=to_ms)


def parse_time(raw: object, now: datetime, *, key: str) -> int:
    """``now``, ``now-1h``, ``now-1d/d``, epoch milliseconds, or RFC 3339 → epoch ms."""
    if isinstance(raw, bool):
        raise bad_request(f"{key} must be a time, got {raw!r}")
    if isinstance(raw, float) and not math.isfinite(raw):  # 1e400 reads as infinity
        raise bad_request(f"{key} must be a finite number, got {raw!r}")
    if isinstance(raw, (int, float)):
        return _int64(int(raw), key)
    if not isinstance(raw, str):
        raise bad_request(f"{key} must be a string or epoch milliseconds, got {raw!r}")
    text = raw.strip()
    if text.isascii() and text.isdigit():  # "²".isdigit() holds, but int() refuses it
        return _int64(int(text), key)
    match = _RELATIVE.match(text)
    if match:
        moment = now
        try:
            if match.group("amount"):
                moment = _shift(
                    moment, int(match.group("amount")), match.group("unit"), match.group("sign")
                )
            if match.group("round"):
                moment = _round_down(moment, match.group("round"))
        except (OverflowError, ValueError):  # past the years datetime can hold
            raise bad_request(f"{key} {raw!r} is out of range") from None
        return int(moment.timestamp() * 1000)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(
            f"{key} {raw!r} is not a time: use now, now-1h, epoch milliseconds or RFC 3339"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _shift(moment: datetime, amount: int, unit: str, sign: str) -> datetime:
    factor = -1 if sign == "-" else 1
    if unit in _UNITS:
        return moment + factor * amount * _UNITS[unit]
    months = amount * (12 if unit == "y" else 1) * factor
    year, month = divmod(moment.month - 1 + months, 12)
    day = min(moment.day, _days_in_month(moment.year + year, month + 1))
    return moment.replace(year=moment.year + year, month=month + 1, day=day)


def _days_in_month(year: int, month: int) -> int:
    following = datetime(year + (month == 12), month % 12 + 1, 1)
    return (following - timedelta(days=1)).day


def _round_down(moment: datetime, unit: str) -> datetime:
    if unit == "s":
        return moment.replace(microsecond=0)
    if unit == "m":
        return moment.replace(second=0, microsecond=0)
    if unit == "h":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "d":
        return day
    if unit == "w":
        return day - timedelta(days=day.weekday())
    if unit == "M":
        return day.replace(day=1)
    return day.replace(month=1, day=1)
