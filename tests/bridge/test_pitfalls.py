"""Regression tests for the Grafana CVEs and proxy pitfalls the bridge must not repeat.

One test (or table) per item of ../shared/reference/peers-and-pitfalls.md §4 that no other
test already proves; docs/security.md maps every item to its test, here or elsewhere. They run
against the authorization-matrix bridge (tests/bridge/test_authorization_matrix.py): token
auth, the Python fixture plugin, and a stand-in Grafana that is also the datasource upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from bridge.dsproxy.hosts import canonical_host
from plugin_host.supervisor import PluginState
from tests.bridge.conftest import PY, PY_GROUP, VERSION, PluginStates, eventually, token_for
from tests.bridge.test_authorization_matrix import DS, Matrix, matrix_scene

ASYNC = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scene(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Matrix]:
    async with matrix_scene(tmp_path_factory.mktemp("pitfalls")) as running:
        yield running


# -- CVE-2025-3454: an extra "/" skipped route-level authorization ----------------------------

ADMIN_ROUTE_SPELLINGS = [
    f"{DS}/proxy//admin/x",
    f"{DS}/proxy/./admin/x",
    f"{DS}/proxy/api/../admin/x",
    f"{DS}/proxy/api/%2e%2e/admin/x",
    f"{DS}/proxy/%2Fadmin/x",
    f"{DS}/proxy/admin%2Fx",
    f"{DS}//proxy/admin/x",
    f"/apis/{PY_GROUP}/{VERSION}/namespaces/default/datasources/py/./proxy/admin/x",
    f"/apis//{PY_GROUP}/{VERSION}/namespaces/default/datasources/py/proxy/admin/x",
    f"{DS}/proxy/admin\\x",
    f"{DS}/proxy/ADMIN/x",
]


@ASYNC
@pytest.mark.parametrize("path", ADMIN_ROUTE_SPELLINGS)
async def test_no_spelling_of_an_admin_route_lets_a_viewer_through(
    scene: Matrix, path: str
) -> None:
    """Routing and authorization use one normalised path: a viewer never reaches ``admin``.

    The routes render under ``/routed`` on the stand-in; a path no route matches goes to the
    datasource's own URL without any route's credentials, as in Grafana (route prefixes are
    case-sensitive there too).
    """
    seen = len(scene.grafana.seen)
    answer = await scene.door.call("GET", path, user="viewer")
    reached = [s.raw_path for s in scene.grafana.seen[seen:]]
    assert not any(p.startswith("/routed/admin") for p in reached), (answer.status, reached)
    if answer.status >= 400:
        assert answer.json()["kind"] == "Status", answer.text


# -- CVE-2022-39201: Grafana's own credentials forwarded to the plugin or datasource ----------


@ASYNC
@pytest.mark.parametrize("where", ["resource", "proxy"])
async def test_callers_grafana_credentials_never_reach_plugins_or_datasources(
    scene: Matrix, where: str
) -> None:
    token = token_for("viewer")
    headers = {
        "Cookie": "grafana_session=s3ss10n; grafana_session_expiry=1; theme=dark",
        "X-DS-Authorization": "Bearer ds-secret",
        "X-Id-Token": "id-secret",
        "X-Grafana-User": "admin",
    }
    if where == "resource":
        answer = await scene.door.call("GET", f"{DS}/resource/echo", user="viewer", headers=headers)
        assert answer.status == 200, answer.text
        received = json.dumps(answer.json()["headers"])
    else:
        answer = await scene.door.call("GET", f"{DS}/proxy/api/x", user="viewer", headers=headers)
        assert answer.status == 200, answer.text
        received = json.dumps(list(scene.grafana.seen[-1].headers.items()))
    for secret in (token, "s3ss10n", "ds-secret", "id-secret"):
        assert secret not in received, (secret, received)
    # X-Grafana-User is set by the bridge from the caller, never taken from the request.
    assert '"admin"' not in received


# -- CVE-2022-35957: a datasource header that collides with an identity header ----------------


@ASYNC
async def test_datasource_headers_cannot_set_identity_headers(scene: Matrix) -> None:
    """``py`` is provisioned with httpHeaderName1 = X-WEBAUTH-USER, value "admin"."""
    answer = await scene.door.call("GET", f"{DS}/proxy/api/x", user="viewer")
    assert answer.status == 200, answer.text
    sent = scene.grafana.seen[-1].headers
    assert sent.get("X-WEBAUTH-USER") != "admin", dict(sent)
    assert "admin" not in sent.getall("X-Grafana-User", []), dict(sent)


# -- CVE-2023-4399: hosts compared in canonical (IDNA) form --------------------------------------


@pytest.mark.parametrize(
    ("spelled", "canonical"),
    [
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("\u217cocalhost", "localhost"),  # SMALL ROMAN NUMERAL FIFTY looks like "l"
        ("Example.COM.", "example.com"),
    ],
)
def test_hosts_are_compared_in_canonical_form(spelled: str, canonical: str) -> None:
    assert canonical_host(spelled) == canonical


# -- CVE-2026-21720: work left running after the request timed out --------------------------


@ASYNC
async def test_requests_abandoned_by_their_clients_leave_nothing_running(scene: Matrix) -> None:
    """20 slow plugin calls whose clients give up: every task, slot and call ends."""
    door = scene.door
    baseline = len(asyncio.all_tasks())
    timeout = aiohttp.ClientTimeout(total=0.3)
    headers = {"Authorization": f"Bearer {token_for('viewer')}"}

    async def abandoned() -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(TimeoutError):
                await session.get(door.target(f"{DS}/resource/sleep?ms=3000"), headers=headers)

    await asyncio.gather(*(abandoned() for _ in range(20)))

    async def settled() -> bool:
        return (
            door.bridge.deps.concurrency.in_flight(PY) == 0 and len(asyncio.all_tasks()) <= baseline
        )

    await eventually(settled, what="abandoned requests to end")
    answer = await door.call("GET", f"{DS}/resource/echo", user="viewer")
    assert answer.status == 200


# -- kubernetes#58070: error bodies that name the backend --------------------------------------


@ASYNC
async def test_plugin_failures_do_not_tell_clients_where_the_plugin_runs(scene: Matrix) -> None:
    """A killed plugin: the 503 names the plugin and the state, not its pid, socket or stderr."""
    door = scene.door
    before = door.bridge.host.registry.status(PY)
    assert before.pid is not None and before.address is not None
    states = PluginStates(door.bridge, PY)
    os.kill(before.pid, signal.SIGKILL)
    await states.reach(PluginState.RUNNING, PluginState.BACKING_OFF)
    answer = await door.call("GET", f"{DS}/resource/echo", user="viewer")
    assert answer.status == 503, answer.text
    message = answer.json()["message"]
    assert PY in message
    for detail in (str(before.pid), before.address, "/tmp/", "gfbridge-", "Traceback", "signal"):
        assert detail not in message, (detail, message)
    await states.reach(PluginState.BACKING_OFF, PluginState.RUNNING)


# -- docs/security.md names every test it cites ------------------------------------------------


def test_every_test_docs_security_cites_exists() -> None:
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "security.md").read_text()
    refs = [ref for line in text.splitlines() for ref in _test_refs(line)]
    assert len(refs) > 50, "the citation parser found too few tests in docs/security.md"
    assert _missing(root, refs) == [], "docs/security.md cites tests that do not exist"


def _test_refs(line: str) -> list[str]:
    return [
        part
        for part in line.split("`")[1::2]
        if part.startswith("tests/") and ".py" in part.partition("[")[0]
    ]


def _missing(root: Path, refs: list[str]) -> list[str]:
    """The citations that name no test: ``file::name`` needs ``def name(`` in the file, and
    ``file::name[id]`` also the case id as written there (a ``pytest.param`` id, a table key)."""
    missing = []
    for ref in refs:
        file, _, test = ref.partition("::")
        name, _, case = test.partition("[")
        path = root / file
        source = path.read_text() if path.is_file() else ""
        case = case.removesuffix("]")
        no_test = not source or (name and f"def {name}(" not in source)
        no_case = case and f'"{case}"' not in source and f"'{case}'" not in source
        if no_test or no_case:
            missing.append(ref)
    return missing


def test_the_citation_check_catches_what_it_should(tmp_path: Path) -> None:
    line = "| x | `tests/a.py::test_a`, `tests/a.py::test_a[case one]`, `limits.x`, `tests/b.py` |"
    refs = _test_refs(line)
    assert refs == ["tests/a.py::test_a", "tests/a.py::test_a[case one]", "tests/b.py"]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "a.py").write_text('CASES = {"case one": 1}\ndef test_a(case): ...\n')
    assert _missing(tmp_path, refs) == ["tests/b.py"]
    wrong = ["tests/a.py::test_b", "tests/a.py::test_a[case two]", "tests/a.py::test_a[one]"]
    assert _missing(tmp_path, wrong) == wrong
