"""The agent's configuration file (YAML), validated so that every mistake names its key.

A documented example is ``packaging/agent.example.yaml``. ``dwcp config check FILE`` runs
:func:`load_config` and prints the result or the first problem found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dwcp_migrate.errors import ConfigError
from dwcp_migrate.pagecodec import Compression
from dwcp_migrate.transports.tls import TlsConfig, TransportSecurity

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_PORT = 7480
MODES = ("auto", "encode", "passthrough")


@dataclass(frozen=True)
class PeerConfig:
    name: str
    host: str
    port: int
    libvirt_uri: str  # how this host's libvirtd reaches the peer's (p2p migrations)


AUTO = "auto"  # transport.streams / congestion_control: what the detected path mode says


@dataclass(frozen=True)
class TransportSettings:
    # TCP connections per migration channel at start; None (auto): the path mode's count
    # (policies/mode.py: 1 in a datacenter, 4 hybrid, 8 on the internet)
    streams: int | None = None
    min_streams: int = 1
    max_streams: int = 16
    adapt: bool = True  # let measured goodput change the count within [min, max]
    # "auto": the path mode's (cubic in a datacenter, bbr elsewhere); None: the system default
    congestion_control: str | None = AUTO
    # passthrough bytes spliced over a plain TCP connection (agent/lane.py): not encrypted
    direct_lane: bool = False
    # where the destination listens for lanes, direct or TLS (inclusive range); None: an
    # ephemeral port
    direct_lane_ports: tuple[int, int] | None = None
    # passthrough bytes over their own mutual-TLS connections, in threads (agent/tlslane.py);
    # the direct lane wins where both are on, and a plaintext agent has no TLS lane
    tls_lane: bool = True


@dataclass(frozen=True)
class CodecSettings:
    mode: str = "auto"  # auto: chosen per migration from the measured link (policies/)
    datacenter: Compression = field(default_factory=lambda: Compression.parse("lz4"))
    # zstd:1: about the ratio of zstd:3 at twice the speed on migration streams (DESIGN.md)
    wan: Compression = field(default_factory=lambda: Compression.parse("zstd:1"))
    cache_mib: int = 1024  # page cache on each side, per migration channel, at most (codecs.py)


@dataclass(frozen=True)
class AgentConfig:
    name: str
    peers: dict[str, PeerConfig]
    socket_dir: Path = Path("/run/dwcp")
    state_dir: Path = Path("/var/lib/dwcp")
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    security: TransportSecurity = field(default_factory=TransportSecurity)
    transport: TransportSettings = field(default_factory=TransportSettings)
    codec: CodecSettings = field(default_factory=CodecSettings)
    source: Path | None = None  # the file it was read from

    @property
    def admin_socket(self) -> Path:
        return self.socket_dir / "admin.sock"

    def outgoing_socket(self, peer: str) -> Path:
        """Where a local QEMU connects to migrate to ``peer`` (and where ``peer``'s QEMU
        listens on its own host: libvirt uses one path on both hosts)."""
        return self.socket_dir / "to" / f"{peer}.sock"


# ---- parsing -------------------------------------------------------------------------------
class _Section:
    """Reads one mapping of the YAML document, remembering the key path for errors."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'the file'}: expected a mapping of keys to values, "
                              f"got {type(data).__name__}")
        self.data = dict(data)
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def require(self, name: str) -> Any:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            raise ConfigError(f"{self.key(name)}: required, missing")
        return self.data[name]

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.key(name)}: expected a string, got {value!r}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: {value} is out of range {low}..{high}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {value!r}")
        return value

    def section(self, name: str) -> _Section:
        return _Section(self.get(name), self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key (known here: "
                              f"{', '.join(sorted(self.used))})")


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(f"{key}: {value!r} is not a valid host name (letters, digits, '.', "
                          "'_', '-'; at most 63)")
    return value


def parse_address(value: Any, key: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected 'HOST' or 'HOST:PORT', got {value!r}")
    host, port = value, default_port
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            raise ConfigError(f"{key}: unbalanced '[' in {value!r}")
        host, rest = value[1:end], value[end + 1:]
        if rest:
            port = _port(rest.lstrip(":"), key)
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text, key)
    if not host:
        raise ConfigError(f"{key}: no host in {value!r}")
    return host, port


def _port(text: str, key: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{key}: {text!r} is not a TCP port (1..65535)")
    return int(text)


def _port_range(value: object, key: str) -> tuple[int, int] | None:
    """``None``, a port, or ``"LOW-HIGH"`` (inclusive), all within 1024..65535."""
    if value is None:
        return None
    text = str(value).strip()
    low_s, _, high_s = text.partition("-")
    try:
        low, high = int(low_s), int(high_s or low_s)
    except ValueError:
        low = high = -1
    if isinstance(value, bool) or not 1024 <= low <= high <= 65535:
        raise ConfigError(f"{key}: {value!r}: use a port or a range LOW-HIGH within "
                          f"1024..65535 (for example 49200-49299)")
    return low, high


def _compression(value: Any, key: str) -> Compression:
    try:
        return Compression.parse(str(value))
    except Exception as exc:
        raise ConfigError(f"{key}: {value!r} is not a compression setting (zstd:N, lz4, "
                          f"none): {exc}") from exc


def parse_config(data: Any, source: Path | None = None) -> AgentConfig:
    top = _Section(data, "")
    name = _name(top.require("name"), "name")
    base = source.parent if source else Path(".")

    peers_section = top.section("peers")
    peers: dict[str, PeerConfig] = {}
    for peer_name in list(peers_section.data):
        key = peers_section.key(str(peer_name))
        _name(peer_name, key)
        if peer_name == name:
            raise ConfigError(f"{key}: a host is not its own peer")
        value = peers_section.get(peer_name)
        if isinstance(value, Mapping):  # long form: {address: ..., libvirt_uri: ...}
            entry = _Section(value, key)
            host, port = parse_address(entry.require("address"), entry.key("address"))
            uri = entry.string("libvirt_uri", f"qemu+tcp://{host}/system")
            entry.finish()
        else:
            host, port = parse_address(value, key)
            uri = f"qemu+tcp://{host}/system"
        if not uri or "://" not in uri:
            raise ConfigError(f"{key}.libvirt_uri: {uri!r} is not a libvirt URI")
        peers[peer_name] = PeerConfig(peer_name, host, port, uri)

    listen_host, listen_port = parse_address(top.get("listen", f"0.0.0.0:{DEFAULT_PORT}"),
                                             "listen")
    tls_section = top.section("tls")
    plaintext = tls_section.boolean("plaintext", False)
    if plaintext:
        if any(k in tls_section.data for k in ("cert", "key", "ca")):
            raise ConfigError("tls.plaintext: true cannot be combined with cert/key/ca")
        security = TransportSecurity(None, plaintext=True)
    else:
        for k in ("cert", "key", "ca"):
            tls_section.string(k)
        security = TransportSecurity(TlsConfig.from_mapping(
            {k: tls_section.data.get(k) for k in ("cert", "key", "ca")}, base))
    tls_section.finish()

    tr = top.section("transport")
    streams: int | None = None
    if tr.get("streams", AUTO) != AUTO:
        streams = tr.integer("streams", 8, 1, 64)
    min_streams = tr.integer("min_streams", 1, 1, 64)
    max_streams = tr.integer("max_streams", max(16, streams or 0), 1, 64)
    if not min_streams <= (streams or min_streams) <= max_streams or min_streams > max_streams:
        raise ConfigError(f"transport: need min_streams <= streams <= max_streams, got "
                          f"{min_streams}, {streams or AUTO}, {max_streams}")
    cc = tr.string("congestion_control", AUTO)
    if cc not in (None, AUTO, "bbr", "cubic", "reno", "system"):
        raise ConfigError(f"transport.congestion_control: {cc!r}: use auto, bbr, cubic, reno "
                          "or system")
    transport = TransportSettings(streams, min_streams, max_streams,
                                  tr.boolean("adapt", True), None if cc == "system" else cc,
                                  tr.boolean("direct_lane", False),
                                  _port_range(tr.get("direct_lane_ports"),
                                              tr.key("direct_lane_ports")),
                                  tr.boolean("tls_lane", True))
    tr.finish()

    cs = top.section("codec")
    mode = cs.string("mode", "auto")
    if mode not in MODES:
        raise ConfigError(f"codec.mode: {mode!r}: use one of {', '.join(MODES)}")
    codec = CodecSettings(
        mode=mode,
        datacenter=_compression(cs.get("datacenter", "lz4"), cs.key("datacenter")),
        wan=_compression(cs.get("wan", "zstd:1"), cs.key("wan")),
        cache_mib=cs.integer("cache_mib", 1024, 1, 65536),
    )
    cs.finish()

    socket_dir = Path(top.string("socket_dir", "/run/dwcp") or "/run/dwcp")
    state_dir = Path(top.string("state_dir", "/var/lib/dwcp") or "/var/lib/dwcp")
    for key, path in (("socket_dir", socket_dir), ("state_dir", state_dir)):
        if not path.is_absolute():
            raise ConfigError(f"{key}: must be an absolute path, got {str(path)!r}")
    # A unix socket path is limited to 107 bytes: check the longest we will create.
    longest = max([len(str(socket_dir / "to" / f"{p}.sock")) for p in peers] + [0])
    if longest > 107:
        raise ConfigError(f"socket_dir: {socket_dir} is too long for unix socket paths "
                          f"({longest} > 107 bytes)")
    top.finish()
    return AgentConfig(name=name, peers=peers, socket_dir=socket_dir, state_dir=state_dir,
                       listen_host=listen_host, listen_port=listen_port, security=security,
                       transport=transport, codec=codec, source=source)


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())  # one line: YAML's message spans several
        raise ConfigError(f"{path}: not valid YAML: {detail}") from exc
    try:
        return parse_config(data, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
