"""The daemon's TOML configuration, parsed into typed dataclasses.

Every error is a ConfigError naming the file, the key and the reason, so the
daemon can exit with one clear line. Nothing here touches a socket or an
image: validation is syntax and ranges only; opening images is the backend's
job at start-up.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_METRICS_LISTEN = "127.0.0.1:9180"
MAX_QUEUES = 16
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class ConfigError(Exception):
    """The configuration is unusable. Raised at load time; fix the file.

    str() is one line: ``FILE: KEY: REASON``.
    """

    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file, self.key, self.reason = file, key, reason


@dataclasses.dataclass(frozen=True)
class EncryptionConfig:
    """`encryption = { key_file = "..." }` or `{ passphrase_file = "..." }`:
    the volume is LUKS2 and is unlocked with exactly one of these."""
    key_file: Path | None = None
    passphrase_file: Path | None = None


@dataclasses.dataclass(frozen=True)
class BlkConfig:
    id: str
    socket: Path
    image: Path
    size: int | None  # bytes; creates (sparse) or grows the image when set
    readonly: bool = False
    queues: int = 1
    queue_size: int = 256
    serial: str = ""
    encryption: EncryptionConfig | None = None


@dataclasses.dataclass(frozen=True)
class UplinkConfig:
    """`uplink = { name = "nitro-vpc0", address = "10.0.0.254/24" }`: a host
    TAP in the VPC's subnet."""
    name: str
    address: ipaddress.IPv4Interface


@dataclasses.dataclass(frozen=True)
class VpcConfig:
    id: str
    cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    mtu: int = 1500
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    lease_seconds: int = 3600
    uplink: UplinkConfig | None = None


@dataclasses.dataclass(frozen=True)
class NetConfig:
    id: str
    socket: Path
    vpc: str
    mac: str  # "52:54:00:12:34:56", lower case
    ip: ipaddress.IPv4Address
    queues: int = 1  # queue pairs
    queue_size: int = 256
    bw_in_bytes_per_sec: int = 0  # 0: unlimited
    bw_out_bytes_per_sec: int = 0
    pps: int = 0


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    runtime_dir: Path
    state_dir: Path
    control_socket: Path
    metrics_listen: str
    log_level: str
    blk: tuple[BlkConfig, ...]
    source: str  # the file the config came from, for messages
    vpc: tuple[VpcConfig, ...] = ()
    net: tuple[NetConfig, ...] = ()


def default_dirs() -> tuple[Path, Path]:
    """Runtime and state directories: systemd's when set, else FHS or XDG."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        runtime = Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    elif os.geteuid() == 0:
        runtime = Path("/run/nitro")
    else:
        runtime = Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/nitro-{os.getuid()}")) / "nitro"
    if os.environ.get("STATE_DIRECTORY"):
        state = Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    elif os.geteuid() == 0:
        state = Path("/var/lib/nitro")
    else:
        state = Path.home() / ".local/state/nitro"
    return runtime, state


def parse_size(value: Any, file: str, key: str) -> int:
    """'1G', '512M', '4096', 1073741824 -> bytes (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(file, key, f"expected a size such as '1G', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    else:
        raise ConfigError(file, key, f"expected a size such as '1G', got {value!r}")
    if n <= 0 or n % 512:
        raise ConfigError(file, key, f"size must be a positive multiple of 512 bytes, got {n}")
    return n


def load(path: str | Path | None, *, runtime_dir: Path | None = None,
         state_dir: Path | None = None) -> DaemonConfig:
    """Load a config file, or the embedded default when path is None."""
    if path is None:
        text = resources.files("nitro").joinpath("default.toml").read_text()
        source = "<embedded default>"
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(source, "-", f"cannot read: {e.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "-", f"invalid TOML: {e}") from None
    return from_dict(doc, source, runtime_dir=runtime_dir, state_dir=state_dir)


def from_dict(doc: dict, source: str, *, runtime_dir: Path | None = None,
              state_dir: Path | None = None) -> DaemonConfig:
    _check_keys(doc, {"daemon", "metrics", "blk", "vpc", "net"}, source, "")
    daemon = _table(doc, "daemon", source)
    _check_keys(daemon, {"runtime_dir", "state_dir", "control_socket", "log_level"}, source, "daemon.")
    metrics = _table(doc, "metrics", source)
    _check_keys(metrics, {"listen"}, source, "metrics.")
    def_runtime, def_state = default_dirs()
    runtime = runtime_dir or Path(_str(daemon, "runtime_dir", source, "daemon.", str(def_runtime)))
    state = state_dir or Path(_str(daemon, "state_dir", source, "daemon.", str(def_state)))
    control = runtime / _str(daemon, "control_socket", source, "daemon.", "control.sock")
    level = _str(daemon, "log_level", source, "daemon.", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(source, "daemon.log_level", f"expected debug|info|warning|error, got {level!r}")
    listen = _str(metrics, "listen", source, "metrics.", DEFAULT_METRICS_LISTEN)
    blk_list = doc.get("blk", [])
    if not isinstance(blk_list, list):
        raise ConfigError(source, "blk", "expected [[blk]] tables")
    blks = tuple(_blk(t, i, source, runtime, state) for i, t in enumerate(blk_list))
    _check_unique(blks, source)
    vpcs = tuple(_vpc(t, i, source) for i, t in enumerate(_array(doc, "vpc", source)))
    nets = tuple(_net(t, i, source, runtime, vpcs) for i, t in enumerate(_array(doc, "net", source)))
    _check_net_unique(vpcs, nets, blks, source)
    return DaemonConfig(runtime, state, control, listen, level, blks, source, vpcs, nets)


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _array(doc: dict, key: str, source: str) -> list:
    v = doc.get(key, [])
    if not isinstance(v, list):
        raise ConfigError(source, key, f"expected [[{key}]] tables")
    return v


def _ipv4(t: dict, key: str, source: str, p: str, kind):
    v = _str(t, key, source, p, None)
    try:
        return kind(v)
    except ValueError as e:
        raise ConfigError(source, p + key, f"not an IPv4 {kind.__name__[4:].lower()}: {e}") from None


def _vpc(t: Any, i: int, source: str) -> VpcConfig:
    p = f"vpc[{i}]."
    if not isinstance(t, dict):
        raise ConfigError(source, f"vpc[{i}]", "expected a table")
    _check_keys(t, {"id", "cidr", "gateway", "mtu", "dns", "lease_seconds", "uplink"}, source, p)
    vpc_id = _str(t, "id", source, p, None)
    if not _ID_RE.match(vpc_id):
        raise ConfigError(source, p + "id", f"must match {_ID_RE.pattern}, got {vpc_id!r}")
    cidr_text = _str(t, "cidr", source, p, None)
    try:
        cidr = ipaddress.IPv4Network(cidr_text, strict=True)
    except ValueError as e:
        raise ConfigError(source, p + "cidr", f"not an IPv4 network such as '10.0.0.0/24': {e}") from None
    if cidr.prefixlen > 30:
        raise ConfigError(source, p + "cidr", f"prefix /{cidr.prefixlen} leaves no room for hosts (at most /30)")
    gw = _ipv4(t, "gateway", source, p, ipaddress.IPv4Address)
    if gw not in cidr or gw in (cidr.network_address, cidr.broadcast_address):
        raise ConfigError(source, p + "gateway", f"{gw} is not a host address of {cidr}")
    mtu = _int(t, "mtu", source, p, 1500, 576, 9000)
    lease = _int(t, "lease_seconds", source, p, 3600, 60, 7 * 86400)
    dns_v = t.get("dns", [])
    if isinstance(dns_v, str):
        dns_v = [dns_v]
    if not isinstance(dns_v, list):
        raise ConfigError(source, p + "dns", f"expected an address or a list of addresses, got {dns_v!r}")
    try:
        dns = tuple(ipaddress.IPv4Address(d) for d in dns_v)
    except ValueError as e:
        raise ConfigError(source, p + "dns", f"not an IPv4 address: {e}") from None
    uplink = None
    if "uplink" in t:
        u = t["uplink"]
        up = p + "uplink."
        if not isinstance(u, dict):
            raise ConfigError(source, p + "uplink", 'expected { name = "nitro-vpc0", address = "10.0.0.254/24" }')
        _check_keys(u, {"name", "address"}, source, up)
        name = _str(u, "name", source, up, None)
        if not _IFNAME_RE.match(name):
            raise ConfigError(source, up + "name", f"not a Linux interface name (1-15 of A-Za-z0-9_.-): {name!r}")
        addr = _ipv4(u, "address", source, up, ipaddress.IPv4Interface)
        if addr.network != cidr or addr.ip in (gw, cidr.network_address, cidr.broadcast_address):
            raise ConfigError(source, up + "address",
                              f"{addr} must be a free host address in {cidr} with prefix /{cidr.prefixlen}")
        uplink = UplinkConfig(name, addr)
    return VpcConfig(vpc_id, cidr, gw, mtu, dns, lease, uplink)


def _rate(t: dict, key: str, source: str, p: str) -> int:
    v = t.get(key, 0)
    if isinstance(v, str):
        v = parse_rate(v, source, p + key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(source, p + key, f"expected a non-negative integer (0: unlimited), got {v!r}")
    return v


def parse_rate(value: str, file: str, key: str) -> int:
    m = re.match(r"^\s*(\d+)\s*([KMG]?)\s*$", value, re.I)
    if not m:
        raise ConfigError(file, key, f"expected a number such as 125000 or '10M', got {value!r}")
    return int(m.group(1)) * {"": 1, "K": 1000, "M": 10**6, "G": 10**9}[m.group(2).upper()]


def _net(t: Any, i: int, source: str, runtime: Path, vpcs: tuple[VpcConfig, ...]) -> NetConfig:
    p = f"net[{i}]."
    if not isinstance(t, dict):
        raise ConfigError(source, f"net[{i}]", "expected a table")
    _check_keys(t, {"id", "socket", "vpc", "mac", "ip", "queues", "queue_size",
                    "bw_in_bytes_per_sec", "bw_out_bytes_per_sec", "pps"}, source, p)
    dev_id = _str(t, "id", source, p, None)
    if not _ID_RE.match(dev_id):
        raise ConfigError(source, p + "id", f"must match {_ID_RE.pattern}, got {dev_id!r}")
    vpc_id = _str(t, "vpc", source, p, None)
    vpc = next((v for v in vpcs if v.id == vpc_id), None)
    if vpc is None:
        raise ConfigError(source, p + "vpc", f"no [[vpc]] with id {vpc_id!r} (have {[v.id for v in vpcs]})")
    mac = _str(t, "mac", source, p, None)
    if not _MAC_RE.match(mac):
        raise ConfigError(source, p + "mac", f"expected a MAC such as '52:54:00:12:34:56', got {mac!r}")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise ConfigError(source, p + "mac", f"{mac} is a multicast or zero address")
    ip = _ipv4(t, "ip", source, p, ipaddress.IPv4Address)
    if ip not in vpc.cidr or ip in (vpc.cidr.network_address, vpc.cidr.broadcast_address, vpc.gateway):
        raise ConfigError(source, p + "ip", f"{ip} is not a free host address of vpc {vpc.id} ({vpc.cidr})")
    if vpc.uplink is not None and ip == vpc.uplink.address.ip:
        raise ConfigError(source, p + "ip", f"{ip} is vpc {vpc.id}'s uplink address")
    qsize = _int(t, "queue_size", source, p, 256, 2, 1024)
    if qsize & (qsize - 1):
        raise ConfigError(source, p + "queue_size", f"must be a power of two, got {qsize}")
    return NetConfig(
        id=dev_id, socket=runtime / _str(t, "socket", source, p, f"{dev_id}.sock"),
        vpc=vpc_id, mac=mac.lower(), ip=ip,
        queues=_int(t, "queues", source, p, 1, 1, MAX_QUEUES), queue_size=qsize,
        bw_in_bytes_per_sec=_rate(t, "bw_in_bytes_per_sec", source, p),
        bw_out_bytes_per_sec=_rate(t, "bw_out_bytes_per_sec", source, p),
        pps=_rate(t, "pps", source, p))


def _check_net_unique(vpcs: tuple[VpcConfig, ...], nets: tuple[NetConfig, ...],
                      blks: tuple[BlkConfig, ...], source: str) -> None:
    seen: set = set()
    for i, v in enumerate(vpcs):
        if v.id in seen:
            raise ConfigError(source, f"vpc[{i}].id", f"duplicate id {v.id!r}")
        seen.add(v.id)
    names: set = set()
    for i, v in enumerate(vpcs):
        if v.uplink is not None:
            if v.uplink.name in names:
                raise ConfigError(source, f"vpc[{i}].uplink.name", f"duplicate interface {v.uplink.name!r}")
            names.add(v.uplink.name)
    ids = {b.id for b in blks}
    sockets = {b.socket for b in blks}
    macs: set = set()
    ips: set = set()
    for i, n in enumerate(nets):
        if n.id in ids:
            raise ConfigError(source, f"net[{i}].id", f"duplicate device id {n.id!r}")
        if n.socket in sockets:
            raise ConfigError(source, f"net[{i}].socket", f"duplicate socket {str(n.socket)!r}")
        if n.mac in macs:
            raise ConfigError(source, f"net[{i}].mac", f"duplicate mac {n.mac}")
        if (n.vpc, n.ip) in ips:
            raise ConfigError(source, f"net[{i}].ip", f"duplicate ip {n.ip} in vpc {n.vpc}")
        ids.add(n.id)
        sockets.add(n.socket)
        macs.add(n.mac)
        ips.add((n.vpc, n.ip))


def _blk(t: Any, i: int, source: str, runtime: Path, state: Path) -> BlkConfig:
    p = f"blk[{i}]."
    if not isinstance(t, dict):
        raise ConfigError(source, f"blk[{i}]", "expected a table")
    _check_keys(t, {"id", "socket", "image", "size", "readonly", "queues", "queue_size",
                    "serial", "encryption"}, source, p)
    dev_id = _str(t, "id", source, p, None)
    if not _ID_RE.match(dev_id):
        raise ConfigError(source, p + "id", f"must match {_ID_RE.pattern}, got {dev_id!r}")
    size = parse_size(t["size"], source, p + "size") if "size" in t else None
    queues = _int(t, "queues", source, p, 1, 1, MAX_QUEUES)
    qsize = _int(t, "queue_size", source, p, 256, 2, 1024)
    if qsize & (qsize - 1):
        raise ConfigError(source, p + "queue_size", f"must be a power of two, got {qsize}")
    serial = _str(t, "serial", source, p, dev_id)
    if len(serial.encode()) > 20:
        raise ConfigError(source, p + "serial", "at most 20 bytes (virtio-blk GET_ID)")
    readonly = t.get("readonly", False)
    if not isinstance(readonly, bool):
        raise ConfigError(source, p + "readonly", f"expected true or false, got {readonly!r}")
    return BlkConfig(
        id=dev_id,
        socket=runtime / _str(t, "socket", source, p, f"{dev_id}.sock"),
        image=state / _str(t, "image", source, p, f"{dev_id}.img"),
        size=size, readonly=readonly, queues=queues, queue_size=qsize, serial=serial,
        encryption=_encryption(t, source, p, state))


def _encryption(t: dict, source: str, prefix: str, state: Path) -> EncryptionConfig | None:
    if "encryption" not in t:
        return None
    e = t["encryption"]
    p = prefix + "encryption"
    if not isinstance(e, dict):
        raise ConfigError(source, p, 'expected a table such as { key_file = "/etc/nitro/vol0.key" }')
    _check_keys(e, {"key_file", "passphrase_file"}, source, p + ".")
    if len(e) != 1:
        raise ConfigError(source, p, "give exactly one of key_file or passphrase_file")
    (key, value), = e.items()
    if not isinstance(value, str) or not value:
        raise ConfigError(source, f"{p}.{key}", f"expected a path, got {value!r}")
    return EncryptionConfig(**{key: state / value})


def _check_unique(blks: tuple[BlkConfig, ...], source: str) -> None:
    for attr in ("id", "socket", "image"):
        seen: set = set()
        for i, b in enumerate(blks):
            v = getattr(b, attr)
            if v in seen:
                raise ConfigError(source, f"blk[{i}].{attr}", f"duplicate {attr} {str(v)!r}")
            seen.add(v)


def _check_keys(t: dict, allowed: set[str], source: str, prefix: str) -> None:
    for k in t:
        if k not in allowed:
            raise ConfigError(source, prefix + k, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(doc: dict, key: str, source: str) -> dict:
    t = doc.get(key, {})
    if not isinstance(t, dict):
        raise ConfigError(source, key, "expected a table")
    return t


def _str(t: dict, key: str, source: str, prefix: str, default: str | None) -> str:
    if key not in t:
        if default is None:
            raise ConfigError(source, prefix + key, "required")
        return default
    v = t[key]
    if not isinstance(v, str):
        raise ConfigError(source, prefix + key, f"expected a string, got {v!r}")
    return v


def _int(t: dict, key: str, source: str, prefix: str, default: int, lo: int, hi: int) -> int:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(source, prefix + key, f"expected an integer in {lo}..{hi}, got {v!r}")
    return v
