"""Hostile HTTP input against one real bridge with real plugin processes (see harness.py).

Input kinds: DataPlaneService objects (the typed validation, and the API's create path), query
bodies, resource paths, and request headers. For every case the answer is a 4xx Kubernetes
Status, or a correct answer (2xx, 207 for a query with per-query errors, the plugin's own answer
for a resource path it was allowed to see) — never a 5xx, never a dropped connection, never a
plugin seeing a ``.``/``..`` segment. Requests the HTTP parser itself refuses (aiohttp answers
those before the application runs: a request line or header that is not HTTP) are 400 plain
text; they are counted apart as ``parser 4xx``.

After the module (in the fixture's teardown): no leaked asyncio task or fd, the same plugin
processes (none restarted by hostile input), no zombie, and a normal query still answers 200.

The hypothesis tests are synchronous and share the module-scoped bridge; that is sound because
each example is an independent request on a fresh connection, and the only state an example
can create (an accepted DataPlaneService) is deleted by the same example.
``BRIDGE_HOSTILE_EXAMPLES`` (default 200) sets the examples per test.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.apis import API_VERSION, KIND, DataPlaneService, InvalidObject
from tests.bridge.conftest import GO_GROUP, PY_GROUP, token_for
from tests.reliability.harness import (
    QUERY_PATH,
    NoAnswer,
    Reply,
    RunningBridge,
    request_bytes,
    running_bridge,
)

EXAMPLES = int(os.environ.get("BRIDGE_HOSTILE_EXAMPLES", "200"))
pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.timeout(120 + EXAMPLES // 2)]
HTTP = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
API = "/apis/aggregation.grafana.app/v0alpha1/dataplaneservices"
RESOURCE = f"/apis/{PY_GROUP}/v0alpha1/namespaces/default/datasources/py/resource/"
GO_QUERY = f"/apis/{GO_GROUP}/v0alpha1/namespaces/default/datasources/go/query"
ADMIN_AUTH = f"Bearer {token_for('admin')}"
HEALTH = f"/apis/{PY_GROUP}/v0alpha1/namespaces/default/datasources/py/health"


@pytest.fixture(scope="module")
def bridge(go_fixture_binary: object) -> Iterator[RunningBridge]:
    yield from running_bridge("hostile-http")


def classify(reply: Reply, *, allowed: tuple[int, ...] = ()) -> str:
    """The outcome of one case; fails the test on a 5xx or an unexplained answer."""
    assert reply.status < 500, f"{reply.status}: {reply.body[:1000]!r}"
    if reply.status in allowed:
        return str(reply.status)
    assert 400 <= reply.status < 500, f"{reply.status}: {reply.body[:1000]!r}"
    if reply.is_status:
        status = reply.json()
        assert status["code"] == reply.status and status["status"] == "Failure"
        assert status["message"]
        return f"{reply.status} Status"
    # Only aiohttp's HTTP parser answers without a Status (before the application runs).
    assert reply.status in (400, 413, 414, 431), f"{reply.status}: {reply.body[:300]!r}"
    assert b"Traceback" not in reply.body
    return f"{reply.status} parser"


# -- JSON values -------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=24)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


def deep(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# -- DataPlaneService objects ------------------------------------------------------------------


def valid_service(name_suffix: str = "hostile") -> dict[str, Any]:
    group = f"{name_suffix}.datasource.grafana.app"
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": f"v0alpha1.{group}"},
        "spec": {
            "pluginID": "bridge-pyfixture-datasource",
            "pluginType": "datasource",
            "group": group,
            "version": "v0alpha1",
            "services": [{"type": "query"}, {"type": "route", "path": "/x/{n}", "method": "GET"}],
        },
    }


SERVICE_PATHS = (
    ("apiVersion",),
    ("kind",),
    ("metadata",),
    ("metadata", "name"),
    ("metadata", "labels"),
    ("spec",),
    ("spec", "pluginID"),
    ("spec", "pluginType"),
    ("spec", "group"),
    ("spec", "version"),
    ("spec", "services"),
)
hostile_strings = st.sampled_from(
    [
        "",
        " ",
        "..",
        "../x",
        "a/b",
        "A",
        "x" * 300,
        "é.grafana.app",
        "v0alpha1",
        "a\0b",
        "*",
        "query",
        "route",
        "/x/{n}/{n}",
        "/../x",
        "{",
    ]
)
service_entries = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["query", "route", "health", "stream", "nope", ""]) | TEXT},
        optional={"path": hostile_strings | TEXT, "method": hostile_strings | TEXT},
    ),
)


@st.composite
def hostile_services(draw: st.DrawFn) -> dict[str, Any]:
    obj = valid_service()
    for path in draw(st.lists(st.sampled_from(SERVICE_PATHS), max_size=4, unique=True)):
        target: Any = obj
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        if path[-1] == "services":
            value: Any = draw(st.lists(service_entries, max_size=4) | json_value)
        else:
            value = draw(hostile_strings | json_value)
        if draw(st.booleans()) and path != ("metadata", "name"):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    return obj


@given(obj=hostile_services())
@HTTP
def test_dataplaneservice_objects_are_validated_precisely(
    bridge: RunningBridge, obj: dict[str, Any]
) -> None:
    try:
        DataPlaneService.from_object(obj)
        typed = "valid"
    except InvalidObject as exc:
        typed = "InvalidObject"
        assert exc.causes and all(cause.field and cause.message for cause in exc.causes)
    reply = bridge.send(request_bytes("POST", API, body=json.dumps(obj).encode()))
    outcome = classify(reply, allowed=(201,))
    if reply.status == 201:
        assert typed == "valid", obj
        name = reply.json()["metadata"]["name"]
        deleted = bridge.send(request_bytes("DELETE", f"{API}/{name}"))
        assert deleted.status == 200, deleted.body[:500]
    elif reply.status == 422:
        details = reply.json()["details"]
        assert details["causes"], details
    bridge.count("DataPlaneService objects", f"{typed}/{outcome}")


content_types = st.sampled_from(
    [
        "application/json",
        "application/yaml",
        "application/merge-patch+json",
        "text/plain",
        "application/json; charset=latin-1",
        "application/vnd.kubernetes.protobuf",
        "",
        "multipart/form-data; boundary=x",
    ]
)


@given(
    body=st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v).encode()),
    ct=content_types,
)
@example(body=deep(5000), ct="application/json")
@example(body=b"[" * 100_000, ct="application/json")
@example(body=b"a: " * 5000 + b"1", ct="application/yaml")
@example(body=b"a: &a [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n", ct="application/yaml")
@example(body=b"\xef\xbb\xbf{}", ct="application/json")
@HTTP
def test_dataplaneservice_bodies_are_refused_precisely(
    bridge: RunningBridge, body: bytes, ct: str
) -> None:
    headers: list[tuple[bytes | str, bytes | str]] = [("Content-Type", ct)] if ct else []
    reply = bridge.send(request_bytes("POST", API, headers=headers, body=body))
    outcome = classify(reply, allowed=(201,))
    if reply.status == 201:
        name = reply.json()["metadata"]["name"]
        assert bridge.send(request_bytes("DELETE", f"{API}/{name}")).status == 200
    bridge.count("DataPlaneService bodies", outcome)


# -- query bodies ------------------------------------------------------------------------------

# Keys the Python fixture obeys in a query model to fail on purpose (a plugin-made error, which
# may rightly be a 5xx); hostile bodies must not carry them.
FIXTURE_INSTRUCTIONS = {"error", "requestError", "status", "errorSource", "hugeString"}


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in FIXTURE_INSTRUCTIONS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


query_fields = {
    "refId": hostile_strings | json_value,
    "datasource": st.fixed_dictionaries({"uid": hostile_strings | json_value}) | json_value,
    "maxDataPoints": json_value | st.integers(),
    "intervalMs": json_value | st.integers(),
    "queryType": json_value,
    "points": json_value,
    "timeRange": json_value,
}
queries = st.fixed_dictionaries({}, optional=query_fields).map(scrub)
time_values = st.sampled_from(["now-1h", "now", "", "now-", "1700000000000", "-1", "now/d"])


@st.composite
def nearly_valid_bodies(draw: st.DrawFn) -> bytes:
    """A valid query body with a few fields of its queries (or its range) made hostile."""
    count = draw(st.integers(1, 3))
    body: dict[str, Any] = {
        "from": "now-1h",
        "to": "now",
        "queries": [
            {"refId": chr(65 + i), "points": 2, "datasource": {"uid": "__UID__"}}
            for i in range(count)
        ],
    }
    for query in body["queries"]:
        query.update(draw(st.fixed_dictionaries({}, optional=query_fields).map(scrub)))
    if draw(st.booleans()):
        body[draw(st.sampled_from(["from", "to"]))] = draw(time_values | json_value)
    return json.dumps(body).encode()


query_bodies = st.one_of(
    nearly_valid_bodies(),
    nearly_valid_bodies(),
    st.fixed_dictionaries(
        {},
        optional={
            "from": time_values | json_value,
            "to": time_values | json_value,
            "queries": st.lists(queries, max_size=5) | json_value,
            "debug": json_value,
        },
    ).map(lambda d: json.dumps(d).encode()),
    json_value.map(lambda v: json.dumps(scrub(v)).encode()),
    st.binary(max_size=300),
)


@given(body=query_bodies, go=st.booleans())
@example(body=deep(100_000), go=False)
@example(body=b'{"queries": [' + b'{"refId": "A"},' * 2000 + b"{}]}", go=False)
@example(
    body=b'{"from": "now-1h", "to": "now", "queries": [{"refId": "A", "maxDataPoints": 1e308}]}',
    go=True,
)
@example(body=b'{"queries": [{"refId": "A", "intervalMs": NaN}]}', go=False)
@example(body=b'{"queries": [{"refId": "\\ud800"}]}', go=True)
@HTTP
def test_query_bodies_get_an_answer_or_a_precise_refusal(
    bridge: RunningBridge, body: bytes, go: bool
) -> None:
    path = GO_QUERY if go else QUERY_PATH
    body = body.replace(b"__UID__", b"go" if go else b"py")
    headers: list[tuple[bytes | str, bytes | str]] = [("Content-Type", "application/json")]
    reply = bridge.send(request_bytes("POST", path, headers=headers, body=body))
    outcome = classify(reply, allowed=(200, 207))
    if reply.status in (200, 207):
        assert "results" in reply.json()
    bridge.count("query bodies (go)" if go else "query bodies (python)", outcome)


# -- resource paths ----------------------------------------------------------------------------

DOT_DOT = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "%c0%ae%c0%ae",
    "%e0%80%ae%e0%80%ae",
    "%uff0e%uff0e",
    "\uff0e\uff0e",
    "%ef%bc%8e%ef%bc%8e",
    "..%2f",
    "..%5c",
    "..\\",
    "\\..",
    "..;",
    "..%00",
    "%2e%2e%2f",
    "..%252f",
]
segments = st.one_of(
    st.sampled_from(DOT_DOT),
    st.sampled_from(["echo", "status", "404", "", "a", "%00", "%2f", "%5c", "~", "%", "%zz"]),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
    st.integers(300, 20_000).map(lambda n: "a" * n),
)
resource_paths = st.lists(segments, min_size=1, max_size=6).map("/".join)


def plugin_saw(reply: Reply) -> str | None:
    """The path the Python fixture was called with, if it answered (its own 404 names it)."""
    if reply.is_status or not reply.headers.get("content-type", "").startswith("application/"):
        return None
    try:
        doc = reply.json()
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("status"), int) and len(doc) == 1:
        return f"status/{doc['status']}"  # the fixture's status/<code> route answered
    message = doc.get("message", "") if isinstance(doc, dict) else ""
    found = re.fullmatch(r"no such resource: (.*)", message, re.S)
    return found.group(1) if found else None


def percent_encoded(path: str) -> str:
    """Each segment percent-encoded as a client would (UTF-8; ``%`` escapes already in it
    kept), so that non-ASCII, NUL, spaces and ``\\`` pass the HTTP parser and reach the router
    and the plugin; ``.`` and ``..`` stay as they are (unreserved characters)."""
    return "/".join(quote(part, safe="%") for part in path.split("/"))


@given(
    path=resource_paths,
    query=st.sampled_from(["", "?x=1", "?x=..%2f..", "?%00=1", "?" + "a" * 9000]),
    encode=st.booleans(),
)
@example(path="../../../../api/admin/users", query="", encode=False)
@example(path="%2e%2e/%2e%2e/%2e%2e/api/admin/users", query="", encode=False)
@example(path="echo/%2e%2e%2fadmin", query="", encode=False)
@example(path="a/../../x", query="", encode=False)
@example(path="a//b", query="", encode=False)
@example(path="a" * 70_000, query="", encode=False)
@example(path="\uff0e\uff0e/\uff0e\uff0e/api", query="", encode=True)
@example(path="echo/a\0b/\u00e9", query="", encode=True)
@HTTP
def test_resource_paths_never_reach_the_plugin_with_dot_segments(
    bridge: RunningBridge, path: str, query: str, encode: bool
) -> None:
    """Generated paths as they are (raw non-ASCII or control characters in the request line:
    mostly refused by the HTTP parser) and percent-encoded (they reach the router and, unless
    it refuses them, the plugin); the summary prints the split."""
    if encode:
        path = percent_encoded(path)
    reply = bridge.send(request_bytes("GET", RESOURCE + path + query))
    outcome = classify(reply, allowed=(200, 404))
    if reply.is_status:  # the bridge's own answer, its 404s included: a 4xx Status
        outcome = classify(reply)
    elif reply.status in (200, 404):
        seen = plugin_saw(reply)
        if reply.status == 200:
            seen = reply.json().get("path", seen)
        assert seen is not None, reply.body[:300]
        # The plugin gets the path decoded once (as Grafana passes it); what it would see after
        # decoding again (``%252e`` -> ``%2e``) is a literal, not a dot segment.
        parts = seen.replace("\\", "/").split("/")
        assert ".." not in parts and "." not in parts, (path, seen)
        assert "\0" not in seen, (path, seen)
        outcome = f"{reply.status} from plugin"
    bridge.count("resource paths (percent-encoded)" if encode else "resource paths (raw)", outcome)


# -- headers -----------------------------------------------------------------------------------

authorizations = st.one_of(
    st.just(ADMIN_AUTH),
    st.sampled_from(
        [
            "",
            "Bearer",
            "Bearer ",
            "bearer token-of-admin",
            "Bearer  token-of-admin",
            "Bearer token-of-admin ",
            "Bearer token-of-admin\t",
            "Basic " + base64.b64encode(b"admin:admin").decode(),
            "Basic !!!",
            "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
            "Token token-of-admin",
            "Bearer token-of-nobody-at-all",
            "Bearer " + "A" * 7000,
            "Bearer tök",
            "Bearer token-of-admin\x00",
        ]
    ),
    st.text(
        st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=60
    ),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=30).map(
        lambda t: "Bearer " + t
    ),
)
extra_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "X-Grafana-Org-Id",
                "X-Grafana-User",
                "X-WEBAUTH-USER",
                "Cookie",
                "X-Forwarded-For",
                "Accept",
                "Accept-Encoding",
                "Content-Type",
                "X-Ds-Authorization",
                "Grafana-Org-Id",
                "Impersonate-User",
                "X-Huge",
            ]
        ),
        st.one_of(
            st.sampled_from(["", "1", "2", "-1", "99999999999999999999", "admin", "*/*;q=x"]),
            st.text(
                st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
                max_size=40,
            ),
            st.integers(1000, 20_000).map(lambda n: "h" * n),
        ),
    ),
    max_size=6,
)


@given(
    auth=st.lists(authorizations, min_size=0, max_size=3),
    extra=extra_headers,
    many=st.sampled_from([0, 0, 0, 150]),
    target=st.sampled_from([HEALTH, API]),
)
@example(auth=[ADMIN_AUTH, "Bearer token-of-viewer-x"], extra=[], many=0, target=API)
@example(auth=["Bearer nope", ADMIN_AUTH], extra=[], many=0, target=HEALTH)
@example(auth=[ADMIN_AUTH], extra=[("X-Huge", "h" * 100_000)], many=0, target=API)
@example(auth=[ADMIN_AUTH], extra=[], many=5000, target=API)
@HTTP
def test_hostile_headers_are_refused_precisely(
    bridge: RunningBridge,
    auth: list[str],
    extra: list[tuple[str, str]],
    many: int,
    target: str,
) -> None:
    """Odd, duplicated, non-ASCII, huge or many headers: 4xx unless the caller is plainly admin."""
    headers: list[tuple[bytes | str, bytes | str]] = [("Authorization", a) for a in auth]
    headers += [(name, value.encode("latin-1")) for name, value in extra]
    headers += [(f"X-Filler-{i}", "x") for i in range(many)]
    reply = bridge.send(request_bytes("GET", target, headers=headers, authorization=None))
    if reply.status == 200:
        assert plainly_admin(auth), (auth, reply.body[:300])
        outcome = "200"
    else:
        outcome = classify(reply)
    if not auth:
        assert reply.status >= 400
    if len(auth) > 1 and reply.is_status:  # Authorization is a singleton field
        assert reply.status in (400, 431), (auth, reply.body[:300])
    bridge.count("headers", outcome)


def plainly_admin(auth: list[str]) -> bool:
    """One Authorization header carrying admin's bearer token; the scheme is case-insensitive
    (RFC 9110 section 11.1) and surrounding whitespace is not part of the token."""
    if len(auth) != 1:
        return False
    scheme, _, credentials = auth[0].strip(" \t").partition(" ")
    return scheme.lower() == "bearer" and credentials.strip(" \t") == token_for("admin")


def test_bridge_answers_after_raw_garbage(bridge: RunningBridge) -> None:
    """Bytes that are not HTTP at all: a 400 from the parser or a closed connection, then on."""
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET\r\n\r\n", b"\0" * 5000):
        try:
            reply = bridge.send(garbage)
            outcome = classify(reply)
        except NoAnswer:
            outcome = "closed"
        bridge.count("raw garbage", outcome)
    assert bridge.normal_query().status == 200
