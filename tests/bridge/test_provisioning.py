"""Grafana provisioning files: expansion, defaults, stable ids, reloads, and precise errors."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

import pytest

from bridge.provisioning import (
    AppSettings,
    ProvisioningError,
    ProvisioningSettings,
    ProvisioningStore,
    datasource_id,
    load_provisioning,
)
from bridge.provisioning_values import Expander, ExpansionError
from bridge.status import StatusError

ENV = {"PORT": "9090", "PG_USER": "grafana", "PASSWORD": "Pa$sw0rd", "ORG": "2", "TRUE": "true"}

PROMETHEUS = """\
apiVersion: 1
datasources:
  - name: Prometheus
    type: prometheus
    uid: prom
    url: http://localhost:$PORT
    isDefault: true
    jsonData:
      httpMethod: POST
      timeInterval: ${PORT}s
      nested: {list: [a, "$PG_USER", 3, true], price: "$$5"}
      keepCookies: [session_a]
      since: 2024-01-02
    secureJsonData:
      basicAuthPassword: ${PASSWORD}
      pin: 0123
  - name: Postgres
    type: grafana-postgresql-datasource
    orgId: $ORG
    url: db:5432
    user: $__env{PG_USER}
    database: metrics
    basicAuth: $TRUE
    basicAuthUser: reader
"""


def write(path: Path, text: str, *, mtime_s: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))
    return path


def touch_forward(path: Path, text: str) -> None:
    """Rewrite a file with an mtime certainly later than before, however coarse the clock."""
    before = path.stat().st_mtime
    path.write_text(text)
    os.utime(path, (before + 1, before + 1))


def store(root: Path, env: dict[str, str] | None = None) -> ProvisioningStore:
    return ProvisioningStore(
        ProvisioningSettings(directories=(root,), reload_interval=0.01), env=env or ENV
    )


def test_datasources_with_expansion_and_defaults(tmp_path: Path) -> None:
    write(tmp_path / "datasources" / "prom.yaml", PROMETHEUS, mtime_s=1_700_000_000.5)
    s = store(tmp_path)
    prom = s.lookup_datasource(1, "prom")
    assert prom is not None
    assert (prom.name, prom.type, prom.org_id, prom.url) == (
        "Prometheus",
        "prometheus",
        1,
        "http://localhost:9090",
    )
    assert (prom.user, prom.database, prom.basic_auth, prom.basic_auth_user) == ("", "", False, "")
    assert prom.is_default
    assert dict(prom.json_data) == {
        "httpMethod": "POST",
        "timeInterval": "9090s",
        "nested": {"list": ["a", "grafana", 3, True], "price": "$5"},
        "keepCookies": ["session_a"],
        "since": "2024-01-02",
    }
    # Expanded once: the "$sw0rd" inside the variable's value is not expanded again.
    assert dict(prom.secure_json_data) == {"basicAuthPassword": "Pa$sw0rd", "pin": "0123"}
    assert "Pa$sw0rd" not in repr(prom)
    assert prom.last_updated_ms == 1_700_000_000_500

    pg = s.lookup_datasource(2, safe_uid("Postgres"))
    assert pg is not None
    assert (pg.org_id, pg.user, pg.database, pg.basic_auth, pg.basic_auth_user) == (
        2,
        "grafana",
        "metrics",
        True,
        "reader",
    )
    assert s.lookup_datasource(1, pg.uid) is None  # org 2's datasource is not in org 1
    assert [d.name for d in s.datasources(2)] == ["Postgres"]


def safe_uid(name: str) -> str:
    # Grafana: "P" followed by the first 8 bytes of SHA-256(name), hex, upper case.
    return "P" + hashlib.sha256(name.encode()).digest()[:8].hex().upper()


def test_derived_uid_matches_grafana(tmp_path: Path) -> None:
    write(tmp_path / "datasources" / "a.yaml", PROMETHEUS)
    pg = next(d for d in store(tmp_path).datasources() if d.name == "Postgres")
    assert pg.uid == safe_uid("Postgres")
    assert len(pg.uid) == 17


def test_ids_are_stable_non_zero_and_js_safe(tmp_path: Path) -> None:
    path = write(tmp_path / "datasources" / "prom.yaml", PROMETHEUS)
    first = store(tmp_path)
    ids = {(d.org_id, d.uid): d.id for d in first.datasources()}
    assert all(0 < i < 2**53 for i in ids.values())
    assert len(set(ids.values())) == len(ids)
    touch_forward(path, PROMETHEUS.replace("httpMethod: POST", "httpMethod: GET"))
    assert first.check()
    assert {(d.org_id, d.uid): d.id for d in first.datasources()} == ids
    # A restart derives the same ids, with no stored state.
    assert {(d.org_id, d.uid): d.id for d in store(tmp_path).datasources()} == ids
    assert datasource_id(1, "prom") == ids[(1, "prom")]
    assert datasource_id(1, "prom") != datasource_id(2, "prom")


def test_last_updated_changes_with_the_datasource_only(tmp_path: Path) -> None:
    path = write(tmp_path / "datasources" / "prom.yaml", PROMETHEUS, mtime_s=1_700_000_000)
    s = store(tmp_path)
    prom_before = s.datasource(1, "prom")
    pg_before = s.datasource(2, safe_uid("Postgres"))
    assert not s.check()  # nothing changed

    touch_forward(path, PROMETHEUS.replace("httpMethod: POST", "httpMethod: GET"))
    assert s.check()
    assert s.datasource(1, "prom").last_updated_ms > prom_before.last_updated_ms
    assert s.datasource(1, "prom").json_data["httpMethod"] == "GET"
    # Same file, unchanged settings: the SDK keeps that instance.
    assert s.datasource(2, safe_uid("Postgres")).last_updated_ms == pg_before.last_updated_ms

    # Even an edit that moves the mtime backwards must move lastUpdatedMS forwards.
    later = s.datasource(1, "prom").last_updated_ms
    write(path, PROMETHEUS.replace("httpMethod: POST", "httpMethod: PUT"), mtime_s=1_600_000_000)
    assert s.check()
    assert s.datasource(1, "prom").last_updated_ms > later


def test_bad_edit_keeps_the_last_good_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "datasources" / "prom.yaml", PROMETHEUS)
    s = store(tmp_path)
    caplog.set_level(logging.ERROR, logger="bridge.provisioning")
    touch_forward(path, "apiVersion: 1\ndatasources:\n  - name: [unclosed\n")
    for _ in range(3):
        assert not s.check()
    assert s.lookup_datasource(1, "prom") is not None
    assert s.generation == 1
    error = s.last_error
    assert error is not None and "prom.yaml:" in str(error)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    touch_forward(path, PROMETHEUS.replace("uid: prom", "uid: prom2"))
    assert s.check()
    assert (s.generation, s.last_error) == (2, None)
    assert s.lookup_datasource(1, "prom") is None
    assert s.lookup_datasource(1, "prom2") is not None


def test_duplicate_uid_names_both_files(tmp_path: Path) -> None:
    one = "apiVersion: 1\ndatasources:\n  - {name: A, type: loki, uid: same}\n"
    two = "apiVersion: 1\ndatasources:\n  - {name: B, type: loki, uid: same}\n"
    write(tmp_path / "datasources" / "one.yaml", one)
    write(tmp_path / "datasources" / "two.yml", two)
    with pytest.raises(ProvisioningError) as caught:
        store(tmp_path)
    message = str(caught.value)
    assert "one.yaml:3" in message and "two.yml:3" in message and "'same'" in message
    # The same uid in another org is a different datasource.
    write(tmp_path / "datasources" / "two.yml", two.replace("uid: same", "uid: same, orgId: 2"))
    assert len(store(tmp_path).datasources()) == 2


def test_delete_datasources_and_file_order(tmp_path: Path) -> None:
    write(
        tmp_path / "datasources" / "10-base.yaml",
        "apiVersion: 1\ndatasources:\n"
        "  - {name: A, type: loki, uid: a}\n"
        "  - {name: B, type: loki, uid: b}\n"
        "  - {name: A, type: loki, uid: a, orgId: 3}\n",
    )
    write(
        tmp_path / "datasources" / "20-prune.yaml",
        "apiVersion: 1\ndeleteDatasources:\n"
        "  - name: A\n"  # org 1 only
        "  - {name: C, orgId: 1}\n"
        "datasources:\n"
        "  - {name: C, type: tempo, uid: c}\n"  # deleted before, then defined: it exists
        "  - {name: B, type: loki, uid: b, url: 'http://new'}\n",  # same name: replaces
    )
    s = store(tmp_path)
    assert sorted((d.org_id, d.uid) for d in s.datasources()) == [(1, "b"), (1, "c"), (3, "a")]
    assert s.datasource(1, "b").url == "http://new"


def test_apps(tmp_path: Path) -> None:
    write(
        tmp_path / "plugins" / "apps.yaml",
        "apiVersion: 1\napps:\n"
        "  - type: my-app\n"
        "    jsonData: {endpoint: 'http://svc:$PORT'}\n"
        "    secureJsonData: {token: $PASSWORD}\n"
        "  - {type: my-app, org_id: 2, disabled: true}\n"
        "  - {type: other-app, orgId: $ORG}\n",
    )
    s = store(tmp_path)
    app = s.lookup_app(1, "my-app")
    assert app is not None
    assert (app.enabled, dict(app.json_data), dict(app.secure_json_data)) == (
        True,
        {"endpoint": "http://svc:9090"},
        {"token": "Pa$sw0rd"},
    )
    assert app.last_updated_ms > 0
    assert "Pa$sw0rd" not in repr(app)
    disabled = s.lookup_app(2, "my-app")
    assert disabled is not None and not disabled.enabled
    assert s.lookup_app(2, "other-app") is not None
    assert s.lookup_app(1, "other-app") is None
    assert AppSettings.unprovisioned(1, "x") == AppSettings(plugin_id="x", org_id=1)


def test_datasource_lookup_errors_are_404(tmp_path: Path) -> None:
    write(tmp_path / "datasources" / "prom.yaml", PROMETHEUS)
    s = store(tmp_path)
    with pytest.raises(StatusError) as caught:
        s.datasource(1, "nope")
    assert caught.value.code == 404
    with pytest.raises(StatusError) as caught:
        s.datasource(1, "prom", plugin_id="loki")
    assert caught.value.code == 404
    assert "'prometheus'" in caught.value.message
    assert s.datasource(1, "prom", plugin_id="prometheus").uid == "prom"


BAD_FILES = [
    # (file text, text the error must contain)
    (
        "apiVersion: 1\ndatasources:\n  - name: A\n    type: x\n    basicAuth: yes\n",
        "x.yaml:5: datasources[0].basicAuth: expected true or false, got 'yes'",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - name: A\n    type: x\n    orgId: two\n",
        "x.yaml:5: datasources[0].orgId: expected an integer",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - name: A\n    type: x\n    orgId: -3\n",
        "datasources[0].orgId: must be positive",
    ),
    ("apiVersion: 1\ndatasources:\n  - type: x\n", "x.yaml:3: datasources[0].name: is required"),
    ("apiVersion: 1\ndatasources:\n  - name: A\n", "datasources[0].type: is required"),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, orgName: Main}\n",
        "datasources[0].orgName: org names cannot be resolved",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, uid: 'a/b'}\n",
        "datasources[0].uid: 'a/b' is not a valid uid",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, uid: " + "u" * 41 + "}\n",
        "is not a valid uid",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, jsonData: [1, 2]}\n",
        "datasources[0].jsonData: expected a mapping",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, jsonData: {v: .nan}}\n",
        "cannot be represented as JSON",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, secureJsonData: {p: {q: 1}}}\n",
        "datasources[0].secureJsonData.p: expected a single value",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, url: 'http://${HOST'}\n",
        "unterminated '${'",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, url: '$__vault{kv:x}'}\n",
        "$__vault{...} is not supported",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, url: '$__file{/nonexistent/secret}'}\n",
        "datasources[0].url: $__file{/nonexistent/secret}",
    ),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, name: B}\n",
        "datasources[0].name: the key appears twice",
    ),
    ("apiVersion: 1\ndatasources: {name: A}\n", "x.yaml:2: datasources: expected a list"),
    ("datasources:\n  - {name: A, type: x}\n", "apiVersion is missing or 0"),
    ("apiVersion: 0\ndatasources: []\n", "version 0 format"),
    ("apiVersion: one\n", "apiVersion: expected an integer"),
    ("- just\n- a list\n", "(top level): expected a mapping"),
    ("apiVersion: 1\n  bad: indentation\n", "x.yaml:2: not valid YAML"),
    ("apiVersion: 1\n---\napiVersion: 1\n", "not valid YAML"),
    (
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, isDefault: true}\n  - {name: B, type: x, isDefault: true}\n",
        "x.yaml:4: isDefault: only one datasource per org can be the default",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    write(tmp_path / "datasources" / "x.yaml", text)
    with pytest.raises(ProvisioningError) as caught:
        store(tmp_path)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("apps:\n  - {org_id: 1}\n", "apps.yaml:2: apps[0].type: is required"),
        ("apps:\n  - {type: a, org_id: 1, orgId: 2}\n", "apps[0].orgId: disagrees with org_id (1)"),
        (
            "apps:\n  - {type: a, org_name: Main}\n",
            "apps[0].org_name: org names cannot be resolved",
        ),
        ("apps:\n  - {type: a, disabled: maybe}\n", "apps[0].disabled: expected true or false"),
    ],
)
def test_app_errors(tmp_path: Path, text: str, expected: str) -> None:
    write(tmp_path / "plugins" / "apps.yaml", text)
    with pytest.raises(ProvisioningError) as caught:
        store(tmp_path)
    assert expected in str(caught.value)


def test_layout_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write(
        first / "datasources" / "a.yaml",
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, uid: a}\n",
    )
    write(first / "datasources" / "notes.txt", "not yaml: [")
    write(first / "datasources" / "sub" / "b.yaml", "not: [read")
    write(first / "datasources" / "empty.yaml", "# only a comment\n")
    write(first / "dashboards" / "d.yaml", "anything: [")
    write(
        second / "datasources" / "c.yml",
        "apiVersion: 1\nprune: true\ndatasources:\n  - {name: C, type: x, uid: c, access: proxy, colour: red}\n",
    )
    caplog.set_level(logging.WARNING, logger="bridge.provisioning")
    s = ProvisioningStore(ProvisioningSettings(directories=(first, second)), env={})
    assert sorted(d.uid for d in s.datasources()) == ["a", "c"]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("c.yml:4: datasources[0].colour: unknown key" in w for w in warnings)
    assert not any("access" in w for w in warnings)


def test_missing_directory_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ProvisioningError, match="does not exist"):
        store(tmp_path / "nope")
    assert ProvisioningStore(ProvisioningSettings(), env={}).datasources() == []


def test_unset_variables_warn_and_expand_to_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(
        tmp_path / "datasources" / "a.yaml",
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, uid: a, user: $NOPE}\n",
    )
    caplog.set_level(logging.WARNING, logger="bridge.provisioning")
    assert store(tmp_path, env={}).datasource(1, "a").user == ""
    assert any("$NOPE is not set" in r.getMessage() for r in caplog.records)


def test_secret_files_are_read_and_watched(tmp_path: Path) -> None:
    secret = write(tmp_path / "secrets" / "pw", "  first-secret\n")
    write(
        tmp_path / "datasources" / "a.yaml",
        f"apiVersion: 1\ndatasources:\n  - name: A\n    type: x\n    uid: a\n"
        f"    secureJsonData: {{password: '$__file{{{secret}}}'}}\n",
    )
    s = store(tmp_path)
    before = s.datasource(1, "a")
    assert before.secure_json_data["password"] == "first-secret"
    touch_forward(secret, "second-secret")
    assert s.check()
    after = s.datasource(1, "a")
    assert after.secure_json_data["password"] == "second-secret"
    assert after.last_updated_ms > before.last_updated_ms


async def test_watch_reloads_in_the_background(tmp_path: Path) -> None:
    path = write(
        tmp_path / "datasources" / "a.yaml",
        "apiVersion: 1\ndatasources:\n  - {name: A, type: x, uid: a}\n",
    )
    s = store(tmp_path)
    task = asyncio.create_task(s.watch())
    try:
        touch_forward(
            path, "apiVersion: 1\ndatasources:\n  - {name: A, type: x, uid: a, url: 'http://b'}\n"
        )
        async with asyncio.timeout(5):
            await s.wait_for_generation(2)
        assert s.datasource(1, "a").url == "http://b"
        path.unlink()
        async with asyncio.timeout(5):
            await s.wait_for_generation(3)
        assert s.lookup_datasource(1, "a") is None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_load_provisioning_without_a_store(tmp_path: Path) -> None:
    write(tmp_path / "datasources" / "prom.yaml", PROMETHEUS)
    state = load_provisioning((tmp_path,), env=ENV)
    assert set(state.datasources) == {(1, "prom"), (2, safe_uid("Postgres"))}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("$PORT", "9090"),
        ("${PORT}", "9090"),
        ("a${PORT}b", "a9090b"),
        ("$PORTx", ""),  # the name runs on: PORTx is unset
        ("${PORT}x", "9090x"),
        ("$$PORT", "$PORT"),
        ("$$$PORT", "$9090"),
        ("cost: 5$", "cost: 5$"),
        ("$ alone", "$ alone"),
        ("$1", ""),  # Go: $1 is a one-character variable name
        ("$__env{PG_USER}", "grafana"),
        ("${PASSWORD}", "Pa$sw0rd"),
    ],
)
def test_expansion_rules(value: str, expected: str) -> None:
    assert Expander(env=ENV).expand(value) == expected


@pytest.mark.parametrize("value", ["${}", "${PORT", "$__secret{x}"])
def test_expansion_errors(value: str) -> None:
    with pytest.raises(ExpansionError):
        Expander(env=ENV).expand(value)
