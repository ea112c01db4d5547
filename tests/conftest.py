"""Shared test setup: fixture plugin locations, and no skipped test under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_PLUGINS = ROOT / "fixtures" / "plugins"
PY_FIXTURE_DIR = FIXTURE_PLUGINS / "python-datasource"
GO_FIXTURE_DIR = FIXTURE_PLUGINS / "go-datasource"
IN_CI = os.environ.get("CI", "").lower() == "true"

# The reliability suites' marker and the summary of their figures (printed by the controller
# under -n, which never loads tests/reliability/conftest.py).
pytest_plugins = ["tests.reliability.summary"]

# Bridges started by tests keep DataPlaneServices in memory, not in ./data/bridge.db; the
# storage tests open their own SQLite files and etcd servers.
os.environ.setdefault("BRIDGE_STORAGE__BACKEND", "memory")
# Tests register the DataPlaneServices they need; auto-registration has tests of its own.
os.environ.setdefault("BRIDGE_DATAPLANE__AUTO_REGISTER", "none")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI a skipped test is a failure: a missing tool must not pass silently."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.fixture(scope="session")
def go_fixture_binary() -> Path:
    """Build (once per session) the Go fixture plugin with the real hashicorp/go-plugin."""
    if shutil.which("go") is None and not Path("/usr/lib/go/bin/go").exists() and not IN_CI:
        pytest.skip("Go toolchain not installed; run scripts/setup.sh")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_go_fixture.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"building the Go fixture failed:\n{result.stdout}\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gfbt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
