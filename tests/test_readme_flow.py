"""The README's quick start and the docs' examples, run as written.

Blocks marked ``<!-- readme-flow: NAME -->`` in README.md and ``<!-- doc-flow: NAME -->`` in
docs/*.md (``DOCS``) are extracted and run — ``sh`` blocks with bash, ``python`` blocks with the
virtualenv's Python — against one bridge started by the real scripts/quickstart.sh (setup
skipped) with the real examples/quickstart.yaml: HTTPS with the CA the script made, real curl,
the real kubectl with the kubeconfig the script wrote. The checkout is mirrored into a
temporary directory (examples copied, fixtures and .venv linked) so the repository's data/ is
never touched; the only change to the commands is their ports (``PORTS``: the quick start's,
and the ones docs/datasource-proxy.md's own demo listens on), so parallel runs do not collide.
Where a doc shows what its commands print, the test compares.
"""

from __future__ import annotations

import base64
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
BLOCK = re.compile(
    r"<!-- (?:readme|doc)-flow: (?P<name>[\w-]+) -->\n```(?P<lang>sh|python)\n(?P<body>.*?)```",
    re.S,
)
FENCE = re.compile(r"```\w*\n(?P<body>.*?)```", re.S)
MARK_VARIABLE = "GFB_TEST_README_MARK"
README_PORT = "3100"
# Ports the commands name: the quick start's, then docs/datasource-proxy.md's bridge and server.
PORTS = (README_PORT, "3199", "8099")
# The docs whose marked blocks run, and the names of those blocks, in order.
DOCS = {
    "streams.md": ["app-stream", "websocket"],
    "datasource-proxy.md": ["try-it"],
    "admission-and-conversion.md": ["reviews"],
    "dataplaneservice-api.md": ["kubectl"],
}


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    after: str  # the text of the file after the block, for the output a doc shows

    def shown_output(self) -> str:
        """The next fenced block: what the doc says the commands print."""
        found = FENCE.search(self.after)
        assert found is not None, "no fenced block after the commands"
        return found["body"]


def flow_blocks(path: Path) -> dict[str, Block]:
    text = path.read_text(encoding="utf-8")
    return {m["name"]: Block(m["lang"], m["body"], text[m.end() :]) for m in BLOCK.finditer(text)}


def doc_blocks(doc: str) -> dict[str, Block]:
    blocks = flow_blocks(ROOT / "docs" / doc)
    assert list(blocks) == DOCS[doc], list(blocks)
    return blocks


def readme_blocks() -> dict[str, str]:
    blocks = flow_blocks(README)
    assert list(blocks) == ["query", "more", "kubectl", "client-cert"], list(blocks)
    assert {block.lang for block in blocks.values()} == {"sh"}
    return {name: block.body for name, block in blocks.items()}


@dataclass
class Checkout:
    root: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def run_block(self, body: str, lang: str = "sh") -> str:
        """Run a block in the checkout; its stdout. Only the ports change (``PORTS``)."""
        ports = {README_PORT: str(self.port)}
        ports.update((port, str(free_port())) for port in PORTS[1:])
        script = body
        for documented, port in ports.items():
            script = re.sub(rf"\b{documented}\b", port, script)
            assert not re.search(rf"\b{documented}\b", script)
        command = ["bash", "-euo", "pipefail", "-c", script]
        if lang == "python":
            command = [str(self.root / ".venv" / "bin" / "python"), "-c", script]
        result = subprocess.run(
            command,
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


@pytest.fixture(scope="module")
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
        # The blocks run without the quick start's BRIDGE_SERVER__LISTEN: a bridge a block
        # starts itself (docs/datasource-proxy.md) listens where its own config says.
        block_env = {k: v for k, v in env.items() if not k.startswith("BRIDGE_")}
        checkout = Checkout(root, port, block_env, process, log)
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


def _sse_events(text: str) -> list[tuple[str, dict[str, object]]]:
    """(event name, data) of each Server-Sent Event in ``text``; ``time`` values dropped."""
    events = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "data" not in fields:  # a ": heartbeat" comment
            continue
        data = json.loads(fields["data"])
        data.pop("time", None)
        events.append((fields.get("event", "message"), data))
    return events


def _commented_output(body: str) -> str:
    """What a block's ``#   `` comment lines show as its output."""
    return "\n".join(
        line.removeprefix("#").removeprefix("   ")
        for line in body.splitlines()
        if line.startswith("#")
    )


def test_the_streams_doc_works_as_written(quickstart: Checkout) -> None:
    blocks = doc_blocks("streams.md")
    app = blocks["app-stream"]
    output = quickstart.run_block(app.body)
    assert _sse_events(output) == _sse_events(_commented_output(app.body)), output

    websocket = blocks["websocket"]
    printed = quickstart.run_block(websocket.body, websocket.lang).splitlines()
    assert len(printed) == 5, printed
    messages = [json.loads(line) for line in printed]
    assert messages[0] == {"path": "ticks/demo"}, messages
    assert {"hello": "from python"} in messages[1:], messages
    ticks = [m["tick"] for m in messages if "tick" in m]
    assert ticks == list(range(len(ticks))) and ticks, messages


def test_the_datasource_proxy_doc_works_as_written(quickstart: Checkout) -> None:
    block = doc_blocks("datasource-proxy.md")["try-it"]
    printed = quickstart.run_block(block.body).splitlines()
    shown = block.shown_output().splitlines()
    assert len(printed) == len(shown) == 3, printed
    for line, documented in zip(printed, shown, strict=True):
        # The doc elides the Status's other fields with "...".
        for piece in documented.split("..."):
            assert piece.strip(", ") in line, (documented, line)


def test_the_admission_and_conversion_doc_works_as_written(quickstart: Checkout) -> None:
    block = doc_blocks("admission-and-conversion.md")["reviews"]
    printed = quickstart.run_block(block.body).splitlines()
    shown = block.shown_output().splitlines()
    assert [json.loads(line) for line in printed] == [json.loads(line) for line in shown]
    mutate = json.loads(printed[2])["response"]
    assert json.loads(base64.b64decode(mutate["patch"])) == [
        {"op": "add", "path": "/metadata/labels", "value": {"bridge.fixture/mutated": "true"}}
    ]


def test_the_dataplaneservice_api_doc_works_as_written(quickstart: Checkout) -> None:
    block = doc_blocks("dataplaneservice-api.md")["kubectl"]
    printed = quickstart.run_block(block.body).splitlines()
    shown = block.shown_output().splitlines()
    assert len(printed) == len(shown), printed
    kubeconfig = quickstart.root / ".kube" / "grafana-bridge"
    assert printed[0] == (
        f"wrote {kubeconfig}; try: KUBECONFIG={kubeconfig} kubectl get dataplaneservices"
    )
    assert printed[1:3] == shown[1:3]
    # The table: the same columns and row; only the age differs.
    assert [line.split()[:2] for line in printed[3:]] == [line.split()[:2] for line in shown[3:]]
