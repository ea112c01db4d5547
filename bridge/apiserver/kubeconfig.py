"""``grafana-bridge kubeconfig``: a kubeconfig that points kubectl at the bridge.

The file has one cluster, one user and one context, all named ``context_name``, and is made
current. The token (a Grafana service account token, or one from the bridge's token file)
is written in the clear, so the file is created with mode 0600 and replaced atomically.
:func:`add_arguments` and :func:`run` are the subcommand, in bridge/cli.py's shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    from bridge.config import BridgeConfig

DEFAULT_PATH = Path("~/.kube/grafana-bridge")


def render_kubeconfig(
    *,
    server: str,
    token: str | None,
    insecure: bool,
    ca_file: Path | None,
    context_name: str = "grafana-bridge",
) -> dict[str, Any]:
    """The kubeconfig document; raises ValueError for a combination kubectl would refuse."""
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"server must be an http:// or https:// URL, got {server!r}")
    if insecure and ca_file is not None:
        raise ValueError("choose one of insecure (skip TLS verification) and ca_file, not both")
    if (insecure or ca_file is not None) and parts.scheme != "https":
        raise ValueError("insecure and ca_file only apply to an https:// server")
    if token and parts.scheme != "https":
        # client-go sends credentials only over TLS: the token would never reach the bridge.
        raise ValueError("kubectl sends a token only to an https:// server")
    if not context_name:
        raise ValueError("context_name must not be empty")
    cluster: dict[str, Any] = {"server": server.rstrip("/")}
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    if ca_file is not None:
        cluster["certificate-authority"] = str(ca_file.resolve())
    user: dict[str, Any] = {"token": token} if token else {}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context_name, "cluster": cluster}],
        "users": [{"name": context_name, "user": user}],
        "contexts": [
            {"name": context_name, "context": {"cluster": context_name, "user": context_name}}
        ],
        "current-context": context_name,
        "preferences": {},
    }


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    token: str | None,
    insecure: bool,
    ca_file: Path | None,
    context_name: str = "grafana-bridge",
) -> None:
    """Write the kubeconfig to ``path`` (mode 0600, replacing any file there atomically)."""
    document = render_kubeconfig(
        server=server, token=token, insecure=insecure, ca_file=ca_file, context_name=context_name
    )
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kubeconfig`` subcommand's options."""
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_PATH,
        help=f"where to write the kubeconfig (default {DEFAULT_PATH})",
    )
    parser.add_argument(
        "--server",
        help="the bridge's URL as kubectl reaches it (default: from server.listen, "
        "https when server.tls_cert is set)",
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (kubectl sends it only over https)")
    token.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--certificate-authority", type=Path, help="CA certificate that signed the bridge's"
    )
    tls.add_argument(
        "--insecure-skip-tls-verify", action="store_true", help="do not verify the certificate"
    )
    parser.add_argument("--context", default="grafana-bridge", help="cluster/user/context name")


def default_server(config: BridgeConfig) -> str:
    """The URL of this bridge's own listener, as a local kubectl would reach it."""
    scheme = "https" if config.server.tls_cert is not None else "http"
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - turning "all interfaces" into loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{config.server.port}"


def run(config: BridgeConfig, args: argparse.Namespace) -> int:
    """Write the kubeconfig ``args`` describe; 2 (with a message) when they do not fit."""
    token: str | None = args.token
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"grafana-bridge kubeconfig: {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    path: Path = args.output.expanduser()
    try:
        write_kubeconfig(
            path,
            server=args.server or default_server(config),
            token=token or None,
            insecure=args.insecure_skip_tls_verify,
            ca_file=args.certificate_authority,
            context_name=args.context,
        )
    except (ValueError, OSError) as exc:
        print(f"grafana-bridge kubeconfig: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}; try: KUBECONFIG={path} kubectl get dataplaneservices")
    return 0
