"""The ``datasource-proxy`` service type: plugin.json routes, templates, tokens, the proxy."""

from bridge.dsproxy.proxy import DatasourceLookup, DatasourceProxy, RoutesLookup
from bridge.dsproxy.routes import ProxyRoute, RoutesError, compile_routes, match_route
from bridge.dsproxy.settings import DatasourceProxySettings
from bridge.dsproxy.templates import Template, TemplateData, TemplateError
from bridge.dsproxy.tokens import TokenCache, TokenError, TokenKey

__all__ = [
    "DatasourceLookup",
    "DatasourceProxy",
    "DatasourceProxySettings",
    "ProxyRoute",
    "RoutesError",
    "RoutesLookup",
    "Template",
    "TemplateData",
    "TemplateError",
    "TokenCache",
    "TokenError",
    "TokenKey",
    "compile_routes",
    "match_route",
]
