"""``write_kubeconfig``: a file kubectl reads, private to its owner."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
import yaml

from bridge.apiserver import render_kubeconfig, write_kubeconfig
from bridge.apiserver.kubeconfig import add_arguments, default_server, run
from bridge.config import BridgeConfig


def test_written_file_is_private_and_complete(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    target = tmp_path / "nested" / "config"
    write_kubeconfig(
        target, server="https://bridge.example:3100/", token="t0k3n", insecure=False, ca_file=ca
    )
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    document = yaml.safe_load(target.read_text())
    assert document == {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "grafana-bridge",
                "cluster": {
                    "server": "https://bridge.example:3100",
                    "certificate-authority": str(ca.resolve()),
                },
            }
        ],
        "users": [{"name": "grafana-bridge", "user": {"token": "t0k3n"}}],
        "contexts": [
            {
                "name": "grafana-bridge",
                "context": {"cluster": "grafana-bridge", "user": "grafana-bridge"},
            }
        ],
        "current-context": "grafana-bridge",
        "preferences": {},
    }
    assert [p.name for p in target.parent.iterdir()] == ["config"]  # no temporary file left


def test_replaces_an_existing_file_and_tightens_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_text("old")
    target.chmod(0o644)
    write_kubeconfig(
        target, server="https://h", token=None, insecure=True, ca_file=None, context_name="dev"
    )
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    document = yaml.safe_load(target.read_text())
    assert document["clusters"][0]["cluster"] == {
        "server": "https://h",
        "insecure-skip-tls-verify": True,
    }
    assert document["users"] == [{"name": "dev", "user": {}}]
    assert document["current-context"] == "dev"


def test_anonymous_over_http_is_allowed() -> None:
    document = render_kubeconfig(
        server="http://127.0.0.1:3100", token=None, insecure=False, ca_file=None
    )
    assert document["clusters"][0]["cluster"] == {"server": "http://127.0.0.1:3100"}


@pytest.mark.parametrize(
    ("server", "token", "insecure", "ca", "message"),
    [
        ("127.0.0.1:3100", None, False, False, "http:// or https:// URL"),
        ("ftp://h", None, False, False, "http:// or https:// URL"),
        ("https://h", None, True, True, "not both"),
        ("http://h", None, True, False, "only apply to an https:// server"),
        ("http://h", "t", False, False, "only to an https:// server"),
    ],
)
def test_refused_combinations(
    tmp_path: Path, server: str, token: str | None, insecure: bool, ca: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        write_kubeconfig(
            tmp_path / "config",
            server=server,
            token=token,
            insecure=insecure,
            ca_file=tmp_path / "ca.pem" if ca else None,
        )
    assert not (tmp_path / "config").exists()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"listen": "127.0.0.1:3100"}, "http://127.0.0.1:3100"),
        ({"listen": ":3443", "tls_cert": "c.pem", "tls_key": "k.pem"}, "https://127.0.0.1:3443"),
        ({"listen": "[::1]:3100"}, "http://[::1]:3100"),
        ({"listen": "bridge.internal:80"}, "http://bridge.internal:80"),
    ],
)
def test_default_server_from_the_config(server: dict[str, str], expected: str) -> None:
    assert default_server(BridgeConfig.model_validate({"server": server})) == expected


def test_subcommand_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    config = BridgeConfig.model_validate(
        {"server": {"listen": ":3443", "tls_cert": "c.pem", "tls_key": "k.pem"}}
    )
    target = tmp_path / "kc"
    code = run(
        config,
        _args("-o", str(target), "--token-file", str(token_file), "--insecure-skip-tls-verify"),
    )
    assert code == 0
    assert f"wrote {target}" in capsys.readouterr().out
    document = yaml.safe_load(target.read_text())
    assert document["users"][0]["user"] == {"token": "from-file"}
    assert document["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:3443",
        "insecure-skip-tls-verify": True,
    }


def test_subcommand_refuses_a_token_over_http(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(BridgeConfig(), _args("-o", str(tmp_path / "kc"), "--token", "t"))
    assert code == 2
    assert "only to an https:// server" in capsys.readouterr().err
    assert not (tmp_path / "kc").exists()


def test_subcommand_reports_an_unreadable_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        BridgeConfig(), _args("-o", str(tmp_path / "kc"), "--token-file", str(tmp_path / "no"))
    )
    assert code == 2
    assert "No such file" in capsys.readouterr().err
