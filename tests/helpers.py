"""Helpers for tests that run real plugin processes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import psutil

from plugin_host.handshake import GrafanaIdentity, build_environment

ROOT = Path(__file__).resolve().parent.parent
PY_FIXTURE = ROOT / "fixtures" / "plugins" / "python-datasource" / "gpx_pyfixture_linux_amd64"
PY_FIXTURE_ID = "bridge-pyfixture-datasource"
GO_FIXTURE_ID = "bridge-gofixture-datasource"


def plugin_env(behaviour: str = "", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a plugin gets from the host, plus a fixture behaviour."""
    env = build_environment(host_env=os.environ, grafana=GrafanaIdentity(), extra_env=extra)
    if behaviour:
        env["FIXTURE_BEHAVIOUR"] = behaviour
    else:
        env.pop("FIXTURE_BEHAVIOUR", None)
    return env


def live_children() -> list[psutil.Process]:
    """Child processes of this test process that still exist (zombies included)."""
    return psutil.Process().children(recursive=True)


def zombies() -> list[psutil.Process]:
    found = []
    for child in live_children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def open_fds() -> int:
    return psutil.Process().num_fds()
