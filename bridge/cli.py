"""The ``grafana-bridge`` command: serve, list and check plugins, write kubeconfigs and certs."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge import __doc__ as bridge_doc
from bridge import tls
from bridge.apiserver import kubeconfig
from bridge.app import build_app, handler_kwargs
from bridge.config import BridgeConfig, ConfigError, load_config
from bridge.logsetup import configure_logging
from bridge.provisioning import ProvisioningError
from bridge.server import Bridge
from plugin_host.discovery import DiscoveryResult, discover
from plugin_host.keyring import KeyRing, KeyRingError

log = logging.getLogger("bridge")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"grafana-bridge: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging)
    try:
        code: int = args.run(config, args)
    except (ConfigError, KeyRingError) as exc:
        print(f"grafana-bridge: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grafana-bridge", description=bridge_doc)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", type=Path, help="YAML config file (docs/configuration.md)"
    )
    common.add_argument(
        "--plugins",
        type=Path,
        action="append",
        metavar="DIR",
        help="plugins directory (repeatable; replaces plugins.directories)",
    )
    common.add_argument(
        "--allow-unsigned",
        metavar="IDS",
        help="comma-separated plugin ids allowed to load without a signature",
    )
    common.add_argument(
        "--dev-mode", action="store_true", default=None, help="load unsigned plugins"
    )
    sub = parser.add_subparsers(title="commands")

    serve = sub.add_parser("serve", parents=[common], help="run the bridge")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
    serve.set_defaults(run=_serve)

    kc = sub.add_parser(
        "kubeconfig", parents=[common], help="write a kubeconfig for kubectl against the bridge"
    )
    kubeconfig.add_arguments(kc)
    kc.set_defaults(run=kubeconfig.run)

    certs = sub.add_parser(
        "certs",
        parents=[common],
        help="make a local CA and a server certificate (and client certificates) for TLS",
    )
    tls.add_arguments(certs)
    certs.set_defaults(run=tls.run)

    plugins = sub.add_parser("plugins", help="inspect plugins on disk")
    plugins_sub = plugins.add_subparsers(title="plugin commands")
    listing = plugins_sub.add_parser("list", parents=[common], help="list discovered plugins")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_plugins_list)
    check = plugins_sub.add_parser(
        "check", parents=[common], help="like list; exits 1 when any plugin cannot load"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=_plugins_check)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "plugins", None):
        overrides["plugins.directories"] = [str(p) for p in args.plugins]
    if getattr(args, "allow_unsigned", None):
        overrides["plugins.allow_unsigned"] = [
            i.strip() for i in args.allow_unsigned.split(",") if i.strip()
        ]
    if getattr(args, "dev_mode", None):
        overrides["plugins.dev_mode"] = True
    if getattr(args, "listen", None):
        overrides["server.listen"] = args.listen
    return overrides


# -- serve -----------------------------------------------------------------------------------


def _serve(config: BridgeConfig, args: argparse.Namespace) -> int:
    # `kill -USR2 <pid>`: every thread's Python stack on stderr, even with the event loop
    # blocked (SIGUSR1 logs the asyncio tasks' stacks, which needs a running loop).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    server = config.server
    try:
        ssl_context = tls.server_ssl_context(server)
    except tls.TLSError as exc:
        raise ConfigError(str(exc)) from None
    warn_if_root(config)
    try:
        bridge = Bridge(config)
    except ProvisioningError as exc:
        raise ConfigError(f"provisioning: {exc}") from None
    # Bound before any plugin starts, so a taken address fails at once and starts nothing.
    try:
        sockets = _bind(server.host, server.port)
    except OSError as exc:
        log.error("cannot listen on %s: %s", server.listen, exc.strerror or exc)
        return 1
    scheme = "https" if ssl_context else "http"
    log.info("grafana-bridge listening on %s://%s", scheme, server.listen)
    try:
        web.run_app(
            build_app(bridge),
            sock=sockets,
            # A client that goes away cancels its request, and with it the plugin call.
            handler_cancellation=True,
            ssl_context=ssl_context,
            shutdown_timeout=server.shutdown_grace,
            print=None,
            access_log=None,
            **handler_kwargs(bridge),  # limits.* parser backstops (bridge/limits.py)
        )
    finally:
        for sock in sockets:
            sock.close()
    return 0


def warn_if_root(config: BridgeConfig) -> bool:
    """Warn (once, at start-up) when the bridge runs as root; True if it warned."""
    if os.geteuid() != 0:
        return False
    if config.plugins.run_as_user:
        log.warning(
            "grafana-bridge runs as root; plugin processes run as %r (plugins.run_as_user)",
            config.plugins.run_as_user,
        )
    else:
        log.warning(
            "grafana-bridge runs as root, and so will every plugin it starts: run it as an "
            "unprivileged user, or set plugins.run_as_user (docs/security.md)"
        )
    return True


def _bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound (not yet listening) to every address ``host`` resolves to."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # The same options asyncio's create_server sets for a host and port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# -- plugins list / check --------------------------------------------------------------------


def _discover(config: BridgeConfig) -> DiscoveryResult:
    host = config.host_config()
    return discover(
        host.plugin_dirs,
        keyring=KeyRing.load(host.public_key_files),
        allow_unsigned=host.allow_unsigned,
        dev_mode=host.dev_mode,
        grafana_root_url=host.grafana_root_url,
        strict_permissions=host.strict_permissions,
    )


def _plugins_list(config: BridgeConfig, args: argparse.Namespace) -> int:
    result = _discover(config)
    _print_result(result, as_json=args.json)
    return 0


def _plugins_check(config: BridgeConfig, args: argparse.Namespace) -> int:
    result = _discover(config)
    _print_result(result, as_json=args.json)
    return 1 if result.errors else 0


def _print_result(result: DiscoveryResult, *, as_json: bool) -> None:
    if as_json:
        doc = {
            "plugins": [
                {
                    "id": p.id,
                    "type": p.type,
                    "version": p.version,
                    "directory": str(p.directory),
                    "executable": str(p.executable) if p.executable else None,
                    "signature": str(p.signature.status),
                    "signatureDetail": p.signature.detail,
                    "parent": p.parent_id,
                }
                for p in result.plugins
            ],
            "errors": [
                {"id": e.plugin_id, "path": str(e.path), "code": str(e.code), "reason": e.reason}
                for e in result.errors
            ],
            "warnings": list(result.warnings),
        }
        print(json.dumps(doc, indent=2))
        return
    rows = [("ID", "TYPE", "VERSION", "SIGNATURE", "EXECUTABLE")]
    for p in result.plugins:
        rows.append(
            (
                p.id,
                p.type,
                p.version or "-",
                str(p.signature.status),
                str(p.executable) if p.executable else "(no backend)",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.errors:
        print(f"\n{len(result.errors)} plugin(s) cannot be loaded:")
        for error in result.errors:
            print(f"  {error}")


if __name__ == "__main__":
    sys.exit(main())
