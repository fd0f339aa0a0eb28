"""The agent's configuration: the example is valid; every mistake names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dwcp_migrate.agent.config import load_config, parse_config
from dwcp_migrate.errors import ConfigError
from dwcp_migrate.paths import REPO_ROOT

EXAMPLE = REPO_ROOT / "packaging" / "agent.example.yaml"


def base() -> dict[str, Any]:
    return {"name": "a", "peers": {"b": "10.0.0.2"}, "tls": {"plaintext": True}}


def test_example_is_valid() -> None:
    # The example's certificate paths do not exist here; TLS files are checked at use.
    cfg = load_config(EXAMPLE)
    assert cfg.name == "hv-a"
    assert cfg.peers["hv-b"].port == 7480
    assert cfg.peers["hv-c"].libvirt_uri == "qemu+tls://hv-c.example.net/system"
    assert cfg.outgoing_socket("hv-b") == Path("/run/dwcp/to/hv-b.sock")


def test_defaults() -> None:
    cfg = parse_config(base())
    assert cfg.listen_port == 7480 and cfg.codec.mode == "auto"
    assert cfg.security.plaintext and cfg.security.tls is None
    assert cfg.peers["b"].libvirt_uri == "qemu+tcp://10.0.0.2/system"
    assert cfg.transport.direct_lane_ports is None
    assert cfg.transport.tls_lane and not cfg.transport.direct_lane
    assert not parse_config({**base(), "transport": {"tls_lane": False}}).transport.tls_lane


@pytest.mark.parametrize("value,expected", [
    ("49200-49299", (49200, 49299)), (50000, (50000, 50000)), (" 2000 - 2001 ", (2000, 2001))])
def test_direct_lane_ports(value: object, expected: tuple[int, int]) -> None:
    cfg = parse_config({**base(), "transport": {"direct_lane_ports": value}})
    assert cfg.transport.direct_lane_ports == expected


@pytest.mark.parametrize("change,key", [
    ({"name": None}, "name"),
    ({"name": "bad name"}, "name"),
    ({"peers": {"b": "10.0.0.2:99999"}}, "peers.b"),
    ({"peers": {"a": "10.0.0.2"}}, "peers.a"),
    ({"peers": {"b": {"adress": "x"}}}, "peers.b"),
    ({"listen": 7480}, "listen"),
    ({"tls": {}}, "tls"),
    ({"tls": {"plaintext": "yes"}}, "tls.plaintext"),
    ({"transport": {"streams": 0}}, "transport.streams"),
    ({"transport": {"streams": 4, "max_streams": 2}}, "transport"),
    ({"transport": {"congestion_control": "vegas"}}, "transport.congestion_control"),
    ({"transport": {"direct_lane_ports": "49300-49200"}}, "transport.direct_lane_ports"),
    ({"transport": {"direct_lane_ports": "80"}}, "transport.direct_lane_ports"),
    ({"transport": {"direct_lane_ports": "many"}}, "transport.direct_lane_ports"),
    ({"transport": {"direct_lane_ports": True}}, "transport.direct_lane_ports"),
    ({"transport": {"tls_lane": "on"}}, "transport.tls_lane"),
    ({"codec": {"mode": "fast"}}, "codec.mode"),
    ({"codec": {"wan": "gzip"}}, "codec.wan"),
    ({"codec": {"cache_mib": "lots"}}, "codec.cache_mib"),
    ({"socket_dir": "relative/dir"}, "socket_dir"),
    ({"sokcet_dir": "/run/x"}, "sokcet_dir"),
])
def test_mistakes_name_their_key(change: dict[str, Any], key: str) -> None:
    data = {**base(), **change}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(key), str(info.value)


def test_bad_file_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text(yaml.safe_dump({**base(), "codec": {"mode": "fast"}}))
    res = subprocess.run([sys.executable, "-m", "dwcp_migrate.cli", "config", "check",
                          str(bad)], capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0
    assert "codec.mode" in res.stderr and "Traceback" not in res.stderr
    bad.write_text("name: [unclosed")
    res = subprocess.run([sys.executable, "-m", "dwcp_migrate.cli", "config", "check",
                          str(bad)], capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "not valid YAML" in res.stderr
    assert res.stderr.strip().count("\n") == 0
    res = subprocess.run([sys.executable, "-m", "dwcp_migrate.cli", "config", "check",
                          str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 1 and "no such configuration file" in res.stderr
