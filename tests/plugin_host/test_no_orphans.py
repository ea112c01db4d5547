"""Killing the host with SIGKILL leaves no plugin process behind, and the next host clears
away the socket directory it left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from plugin_host.process import make_socket_root
from tests.helpers import PY_FIXTURE, ROOT


def test_sigkill_of_the_host_takes_its_plugins_along(go_fixture_binary: Path) -> None:
    host = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.plugin_host.host_main",
            str(PY_FIXTURE),
            str(go_fixture_binary),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert host.stdout is not None
        report = json.loads(host.stdout.readline())
        pids, socket_root = report["pids"], Path(report["socket_root"])
        assert len(pids) == 2 and all(isinstance(p, int) for p in pids)
        assert socket_root.is_dir()
        assert all(psutil.pid_exists(p) for p in pids)
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        assert [p for p in pids if _alive(p)] == []
        # The dead host could not remove its socket directory; the next one does.
        assert socket_root.is_dir()
        root = make_socket_root()
        shutil.rmtree(root)
        assert not socket_root.exists()
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
