"""PluginContext as Grafana fills it, from an identity, provisioned settings and the config map."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bridge.identity import Identity, OrgRole
from bridge.plugin_context import (
    GRAFANA_DEFAULTS,
    SQL_DEFAULTS,
    build_plugin_context,
    default_grafana_config,
)
from bridge.provisioning import (
    AppSettings,
    DataSourceSettings,
    ProvisioningSettings,
    ProvisioningStore,
)
from plugin_host.handshake import GrafanaIdentity
from protos.pluginv2 import backend_pb2 as pb

GRAFANA = GrafanaIdentity(
    version="11.3.0",
    app_url="https://grafana.example.com/",
    feature_toggles=("zToggle", "aToggle", "aToggle"),
)
ANN = Identity(
    login="ann",
    name="Ann",
    email="ann@example.com",
    org_id=2,
    role=OrgRole.EDITOR,
    auth_method="session",
)

DATASOURCES = """\
apiVersion: 1
datasources:
  - name: Warehouse
    type: grafana-postgresql-datasource
    uid: wh
    orgId: 2
    url: db:5432
    user: reader
    database: sales
    basicAuth: true
    basicAuthUser: proxy
    jsonData: {sslmode: disable, maxOpenConns: 5, zeta: 1, alpha: [1, 2]}
    secureJsonData: {password: s3cret}
"""


@pytest.fixture
def warehouse(tmp_path: Path) -> DataSourceSettings:
    (tmp_path / "datasources").mkdir()
    (tmp_path / "datasources" / "ds.yaml").write_text(DATASOURCES)
    store = ProvisioningStore(ProvisioningSettings(directories=(tmp_path,)), env={})
    return store.datasource(2, "wh")


def test_default_config_has_grafanas_defaults() -> None:
    config = default_grafana_config(GRAFANA)
    assert config == {
        "GF_APP_URL": "https://grafana.example.com/",
        "GF_INSTANCE_FEATURE_TOGGLES_ENABLE": "aToggle,zToggle",
        "GF_CONCURRENT_QUERY_COUNT": "10",
        "GF_USER_FACING_DEFAULT_ERROR": "please inspect Grafana server log for details",
        "GF_SQL_ROW_LIMIT": "1000000",
        "GF_SQL_MAX_OPEN_CONNS_DEFAULT": "100",
        "GF_SQL_MAX_IDLE_CONNS_DEFAULT": "100",
        "GF_SQL_MAX_CONN_LIFETIME_SECONDS_DEFAULT": "14400",
    }


def test_default_config_without_url_or_toggles() -> None:
    config = default_grafana_config(GrafanaIdentity())
    assert "GF_APP_URL" not in config
    assert "GF_INSTANCE_FEATURE_TOGGLES_ENABLE" not in config
    assert config == dict(GRAFANA_DEFAULTS)


def test_extra_config_overrides_but_sql_defaults_stay() -> None:
    config = default_grafana_config(
        GrafanaIdentity(),
        extra={
            "GF_SQL_ROW_LIMIT": "500",
            "AWS_AUTH_AssumeRoleEnabled": "false",
            "GF_SQL_MAX_OPEN_CONNS_DEFAULT": "",
        },
    )
    assert config["GF_SQL_ROW_LIMIT"] == "500"
    assert config["AWS_AUTH_AssumeRoleEnabled"] == "false"
    assert config["GF_SQL_MAX_OPEN_CONNS_DEFAULT"] == "100"
    with pytest.raises(TypeError, match="GF_RESPONSE_LIMIT"):
        default_grafana_config(GrafanaIdentity(), extra={"GF_RESPONSE_LIMIT": 5})  # type: ignore[dict-item]


def test_datasource_context(warehouse: DataSourceSettings) -> None:
    context = build_plugin_context(
        identity=ANN,
        org_id=2,
        namespace="org-2",
        plugin_id="grafana-postgresql-datasource",
        plugin_version="12.0.1",
        grafana=GRAFANA,
        grafana_config=default_grafana_config(GRAFANA),
        datasource=warehouse,
    )
    assert (context.orgId, context.pluginId, context.pluginVersion, context.namespace) == (
        2,
        "grafana-postgresql-datasource",
        "12.0.1",
        "org-2",
    )
    assert re.fullmatch(r"Grafana/11\.3\.0 \([a-z0-9]+; [a-z0-9]+\)", context.userAgent)
    assert context.user == pb.User(login="ann", name="Ann", email="ann@example.com", role="Editor")
    ds = context.dataSourceInstanceSettings
    assert ds.id == warehouse.id != 0
    assert (ds.uid, ds.name, ds.url, ds.user, ds.database) == (
        "wh",
        "Warehouse",
        "db:5432",
        "reader",
        "sales",
    )
    assert (ds.basicAuthEnabled, ds.basicAuthUser) == (True, "proxy")
    assert json.loads(ds.jsonData) == {
        "sslmode": "disable",
        "maxOpenConns": 5,
        "zeta": 1,
        "alpha": [1, 2],
    }
    assert ds.jsonData.startswith(b'{"alpha"')  # keys sorted, as Go writes a map
    assert dict(ds.decryptedSecureJsonData) == {"password": "s3cret"}
    assert ds.lastUpdatedMS == warehouse.last_updated_ms > 0
    assert not context.HasField("appInstanceSettings")
    for key, value in SQL_DEFAULTS.items():
        assert context.grafanaConfig[key] == value
    # Survives the wire.
    assert pb.PluginContext.FromString(context.SerializeToString()) == context


def test_app_context_and_no_user(tmp_path: Path) -> None:
    app = AppSettings(
        plugin_id="my-app",
        org_id=1,
        json_data={"b": 1, "a": {"x": [1]}},
        secure_json_data={"k": "v"},
        last_updated_ms=42,
    )
    context = build_plugin_context(
        identity=None,
        org_id=1,
        namespace="default",
        plugin_id="my-app",
        plugin_version="1.0.0",
        grafana=GRAFANA,
        grafana_config={},
        app=app,
    )
    assert not context.HasField("user")  # Grafana-originated calls carry no user
    assert not context.HasField("dataSourceInstanceSettings")
    settings = context.appInstanceSettings
    assert json.loads(settings.jsonData) == {"a": {"x": [1]}, "b": 1}
    assert (dict(settings.decryptedSecureJsonData), settings.lastUpdatedMS) == ({"k": "v"}, 42)
    # Even an empty config map gets the SQL defaults the SDK insists on.
    assert dict(context.grafanaConfig) == dict(SQL_DEFAULTS)


def test_unprovisioned_app_gets_empty_settings() -> None:
    context = build_plugin_context(
        identity=ANN,
        org_id=2,
        namespace="org-2",
        plugin_id="my-app",
        plugin_version="",
        grafana=GRAFANA,
        grafana_config=default_grafana_config(GRAFANA),
        app=AppSettings.unprovisioned(2, "my-app"),
    )
    assert context.HasField("appInstanceSettings")
    assert context.appInstanceSettings.jsonData == b"{}"


@pytest.mark.parametrize(
    ("role", "text"),
    [
        (OrgRole.ADMIN, "Admin"),
        (OrgRole.EDITOR, "Editor"),
        (OrgRole.VIEWER, "Viewer"),
        (OrgRole.NONE, "None"),
    ],
)
def test_user_role_strings(role: OrgRole, text: str) -> None:
    identity = Identity(login="x", name="", email="", org_id=1, role=role)
    context = build_plugin_context(
        identity=identity,
        org_id=1,
        namespace="default",
        plugin_id="p",
        plugin_version="",
        grafana=GRAFANA,
        grafana_config={},
    )
    assert context.user.role == text


def test_settings_from_another_org_are_refused(warehouse: DataSourceSettings) -> None:
    with pytest.raises(ValueError, match="org 2 cannot serve a request in org 1"):
        build_plugin_context(
            identity=ANN,
            org_id=1,
            namespace="default",
            plugin_id="p",
            plugin_version="",
            grafana=GRAFANA,
            grafana_config={},
            datasource=warehouse,
        )
    with pytest.raises(ValueError, match="not both"):
        build_plugin_context(
            identity=ANN,
            org_id=2,
            namespace="org-2",
            plugin_id="p",
            plugin_version="",
            grafana=GRAFANA,
            grafana_config={},
            datasource=warehouse,
            app=AppSettings.unprovisioned(2, "p"),
        )
