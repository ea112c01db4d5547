"""The README's quick start, run as written: scripts/quickstart.sh, then every marked block.

The blocks marked ``<!-- readme-flow: NAME -->`` in README.md are extracted and run with bash,
in order, against a bridge started by the real scripts/quickstart.sh (setup skipped) with the
real examples/quickstart.yaml: HTTPS with the CA the script made, real curl, the real kubectl
with the kubeconfig the script wrote. The checkout is mirrored into a temporary directory
(examples copied, fixtures and .venv linked) so the repository's data/ is never touched; the
only change to the commands is the port, so parallel runs do not collide.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT
from tests.helpers import free_port, kill_all, marked_processes, terminate, without_bridge_settings

pytestmark = [pytest.mark.go, pytest.mark.slow]

README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- readme-flow: (?P<name>[\w-]+) -->\n```sh\n(?P<body>.*?)```", re.S)
MARK_VARIABLE = "GFB_TEST_README_MARK"
README_PORT = "3100"


def readme_blocks() -> dict[str, str]:
    blocks = {m["name"]: m["body"] for m in BLOCK.finditer(README.read_text(encoding="utf-8"))}
    assert list(blocks) == ["query", "more", "kubectl", "client-cert"], list(blocks)
    return blocks


@dataclass
class Checkout:
    root: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def run_block(self, body: str) -> str:
        script = body.replace(f"localhost:{README_PORT}", f"localhost:{self.port}")
        assert f":{README_PORT}" not in script
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{script}\nexit {result.returncode}:\n{result.stderr}"
        return result.stdout


def _wait_ready(checkout: Checkout, timeout: float = 60.0) -> None:
    ca = checkout.root / "data" / "tls" / "ca.crt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkout.process.poll() is not None:
            pytest.fail(f"quickstart exited {checkout.process.returncode}:\n{_tail(checkout.log)}")
        if ca.exists():
            context = ssl.create_default_context(cafile=ca)
            try:
                with urllib.request.urlopen(
                    f"https://localhost:{checkout.port}/readyz", context=context, timeout=2
                ) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError, ssl.SSLError):
                pass
        time.sleep(0.1)
    pytest.fail(f"quickstart bridge not ready within {timeout}s:\n{_tail(checkout.log)}")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture
def quickstart(go_fixture_binary: Path) -> Iterator[Checkout]:
    if shutil.which("curl") is None:
        message = "curl is not installed (the README's commands use it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="gfb-readme-", dir="/tmp"))
    mark = uuid.uuid4().hex
    process: subprocess.Popen[bytes] | None = None
    try:
        shutil.copytree(ROOT / "examples", root / "examples")
        (root / "scripts").mkdir()
        shutil.copy2(ROOT / "scripts" / "quickstart.sh", root / "scripts" / "quickstart.sh")
        (root / "fixtures").symlink_to(ROOT / "fixtures")
        (root / ".venv").symlink_to(ROOT / ".venv")
        port = free_port()
        env = without_bridge_settings(
            HOME=str(root),  # kubectl's cache stays in the temporary checkout
            QUICKSTART_SETUP="0",
            BRIDGE_SERVER__LISTEN=f"127.0.0.1:{port}",
            **{MARK_VARIABLE: mark},
        )
        env.pop("KUBECONFIG", None)
        log = root / "quickstart.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", str(root / "scripts" / "quickstart.sh")],
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        checkout = Checkout(root, port, env, process, log)
        _wait_ready(checkout)
        yield checkout
    finally:
        if process is not None:
            terminate(process, 15)
        kill_all(marked_processes(MARK_VARIABLE, mark))
        shutil.rmtree(root, ignore_errors=True)


def _json_objects(text: str) -> list[dict[str, object]]:
    """Every JSON object in ``text`` (curl prints them without newlines between)."""
    decoder = json.JSONDecoder()
    found, index = [], 0
    while (start := text.find("{", index)) != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        if isinstance(value, dict):
            found.append(value)
        index = end
    return found


def _frames(answer: dict[str, object]) -> list[object]:
    results = answer["results"]
    assert isinstance(results, dict)
    frames = results["A"]["frames"]
    assert isinstance(frames, list)
    return frames


def test_the_readme_quick_start_works_as_written(quickstart: Checkout) -> None:
    blocks = readme_blocks()
    log = quickstart.root / "quickstart.log"
    tls = quickstart.root / "data" / "tls"
    assert {p.name for p in tls.iterdir()} >= {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert "listening on https://" in log.read_text(), _tail(log)

    # The first query, through the Go fixture plugin.
    (answer,) = _json_objects(quickstart.run_block(blocks["query"]))
    assert _frames(answer), answer

    more = quickstart.run_block(blocks["more"])
    objects = _json_objects(more)
    assert objects[0]["status"] == "OK"
    assert objects[1]["path"] == "echo"
    assert re.findall(r"chunk \d", more) == [f"chunk {i}" for i in range(5)], more
    assert "readyz check passed" in more
    assert 'grafana_plugin_request_total{endpoint="checkHealth"' in more
    assert "gofixture_requests_total" in more
    assert objects[-1]["kind"] == "Status" and objects[-1]["code"] == 404

    # kubectl apply, wait, get; then the query through the group it registered.
    name = "v0alpha1.metrics.pyfixture.datasource.grafana.app"
    output = quickstart.run_block(blocks["kubectl"])
    assert f"dataplaneservice.aggregation.grafana.app/{name} created" in output
    assert f"dataplaneservice.aggregation.grafana.app/{name} condition met" in output
    rows = [line.split() for line in output.splitlines()]
    assert ["NAME", "AVAILABLE", "AGE"] in rows
    assert any(row[:2] == [name, "True"] for row in rows), output
    (answer,) = _json_objects(output)
    assert _frames(answer), answer

    # A client certificate, no token: the caller is the CN, an Admin through auth.users.
    output = quickstart.run_block(blocks["client-cert"])
    assert "wrote data/tls/admin.crt" in output
    (listing,) = _json_objects(output)
    assert listing["kind"] == "DataPlaneServiceList", listing
    items = listing["items"]
    assert isinstance(items, list)
    assert name in {item["metadata"]["name"] for item in items}
