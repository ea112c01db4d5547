"""``PluginContext`` as Grafana fills it: org, user, plugin, config, and instance settings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bridge.identity import Identity
from bridge.provisioning import AppSettings, DataSourceSettings
from plugin_host.handshake import GrafanaIdentity
from protos.pluginv2 import backend_pb2 as pb

# Keys of the per-request config map (grafana-plugin-sdk-go backend constants).
APP_URL = "GF_APP_URL"
CONCURRENT_QUERY_COUNT = "GF_CONCURRENT_QUERY_COUNT"
FEATURE_TOGGLES = "GF_INSTANCE_FEATURE_TOGGLES_ENABLE"
USER_FACING_DEFAULT_ERROR = "GF_USER_FACING_DEFAULT_ERROR"
SQL_ROW_LIMIT = "GF_SQL_ROW_LIMIT"
SQL_MAX_OPEN_CONNS_DEFAULT = "GF_SQL_MAX_OPEN_CONNS_DEFAULT"
SQL_MAX_IDLE_CONNS_DEFAULT = "GF_SQL_MAX_IDLE_CONNS_DEFAULT"
SQL_MAX_CONN_LIFETIME_SECONDS_DEFAULT = "GF_SQL_MAX_CONN_LIFETIME_SECONDS_DEFAULT"

# Grafana's defaults.ini values. The SDK's SQL helpers fail without the three *_DEFAULT keys,
# and Grafana always sends them, so every context built here carries them too.
SQL_DEFAULTS: Mapping[str, str] = {
    SQL_MAX_OPEN_CONNS_DEFAULT: "100",  # [sql_datasources] max_open_conns_default
    SQL_MAX_IDLE_CONNS_DEFAULT: "100",  # [sql_datasources] max_idle_conns_default
    SQL_MAX_CONN_LIFETIME_SECONDS_DEFAULT: "14400",  # [sql_datasources] max_conn_lifetime_default
}
GRAFANA_DEFAULTS: Mapping[str, str] = {
    CONCURRENT_QUERY_COUNT: "10",  # [datasources] concurrent_query_count
    USER_FACING_DEFAULT_ERROR: "please inspect Grafana server log for details",  # [log]
    SQL_ROW_LIMIT: "1000000",  # [dataproxy] row_limit
    **SQL_DEFAULTS,
}


def default_grafana_config(
    grafana: GrafanaIdentity, *, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The ``grafanaConfig`` map Grafana sends with a default ``grafana.ini``.

    ``GF_APP_URL`` when a root URL is configured, enabled feature toggles sorted and
    comma-joined, the SQL and query defaults; ``extra`` adds or overrides keys (AWS, Azure,
    secure socks proxy settings...). The map is the same on every request, because a change
    makes the SDK recreate every instance.
    """
    config: dict[str, str] = {}
    if grafana.app_url:
        config[APP_URL] = grafana.app_url
    toggles = sorted({t.strip() for t in grafana.feature_toggles if t.strip()})
    if toggles:
        config[FEATURE_TOGGLES] = ",".join(toggles)
    config.update(GRAFANA_DEFAULTS)
    for key, value in (extra or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"grafanaConfig value for {key!r} must be a string")
        config[key] = value
    for key, value in SQL_DEFAULTS.items():
        if not config.get(key):
            config[key] = value
    return config


def build_plugin_context(
    *,
    identity: Identity | None,
    org_id: int,
    namespace: str,
    plugin_id: str,
    plugin_version: str,
    grafana: GrafanaIdentity,
    grafana_config: Mapping[str, str],
    datasource: DataSourceSettings | None = None,
    app: AppSettings | None = None,
) -> pb.PluginContext:
    """The ``PluginContext`` for one call, filled the way Grafana fills it.

    ``org_id`` is the org the request runs in (from ``authorize_namespace``); the user is the
    caller (absent when the bridge itself originates the call, as in Grafana). Pass the
    datasource for datasource calls and the app's settings for app calls, never both; either
    must belong to ``org_id``, so one org's settings can never reach another org's request.
    """
    if datasource is not None and app is not None:
        raise ValueError("a plugin context carries datasource or app settings, not both")
    for settings in (datasource, app):
        if settings is not None and settings.org_id != org_id:
            raise ValueError(
                f"settings from org {settings.org_id} cannot serve a request in org {org_id}"
            )
    config = dict(grafana_config)
    for key, value in SQL_DEFAULTS.items():
        config.setdefault(key, value)
    context = pb.PluginContext(
        orgId=org_id,
        pluginId=plugin_id,
        pluginVersion=plugin_version,
        grafanaConfig=config,
        userAgent=grafana.user_agent,
        namespace=namespace,
    )
    if identity is not None:
        context.user.CopyFrom(backend_user(identity))
    if datasource is not None:
        context.dataSourceInstanceSettings.CopyFrom(datasource_instance_settings(datasource))
    if app is not None:
        context.appInstanceSettings.CopyFrom(app_instance_settings(app))
    return context


def backend_user(identity: Identity) -> pb.User:
    """Login, name, email and the org role string (``Admin``/``Editor``/``Viewer``/``None``)."""
    return pb.User(
        login=identity.login,
        name=identity.name,
        email=identity.email,
        role=identity.role.value,
    )


def datasource_instance_settings(ds: DataSourceSettings) -> pb.DataSourceInstanceSettings:
    return pb.DataSourceInstanceSettings(
        id=ds.id,
        uid=ds.uid,
        name=ds.name,
        url=ds.url,
        user=ds.user,
        database=ds.database,
        basicAuthEnabled=ds.basic_auth,
        basicAuthUser=ds.basic_auth_user,
        jsonData=_json_bytes(ds.json_data),
        decryptedSecureJsonData=dict(ds.secure_json_data),
        lastUpdatedMS=ds.last_updated_ms,
    )


def app_instance_settings(app: AppSettings) -> pb.AppInstanceSettings:
    return pb.AppInstanceSettings(
        jsonData=_json_bytes(app.json_data),
        decryptedSecureJsonData=dict(app.secure_json_data),
        lastUpdatedMS=app.last_updated_ms,
    )


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    # Sorted keys, as Go's encoding/json writes a map; plugins unmarshal it into structs.
    return json.dumps(
        _plain(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
