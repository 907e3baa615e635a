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
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nitro import _datapath

if TYPE_CHECKING:
    from nitro.devices.blk.backends.nbd import NbdSource

DEFAULT_METRICS_LISTEN = "127.0.0.1:9180"
MAX_QUEUES = 16
# The C switch's tables, so a config that passes --check also fits the datapath.
MAX_VPCS = _datapath.NET_MAX_VPCS
MAX_NET_INTERFACES = _datapath.NET_MAX_PORTS
MAX_NET_QUEUE_PAIRS = _datapath.NET_MAX_PAIRS
MAX_DNS = 63           # DHCP option 6: 4 bytes each, at most 255 bytes
MAX_RATE = 10**12      # bytes or packets per second; beyond any link here
# A remote volume's io_timeout, seconds: EBS's default NVMe I/O timeout is 30 s too.
DEFAULT_IO_TIMEOUT = 30.0
MAX_IO_TIMEOUT = 86400.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_UNIT_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RATE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


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


MAX_BURST_SECONDS = 10**6  # the C limit (nitro_qos_set)
QOS_KEYS = ("iops", "throughput", "burst_iops", "burst_seconds")


@dataclasses.dataclass(frozen=True)
class QosConfig:
    """`qos = { iops = 2000, throughput = "100M", burst_iops = 3000,
    burst_seconds = 60 }`: the volume's limits (docs/volumes.md "QoS"); 0
    is unlimited, and no burst. Changed live by reload and `nitro volume qos`."""
    iops: int = 0
    throughput: int = 0  # data bytes per second
    burst_iops: int = 0
    burst_seconds: int = 0


@dataclasses.dataclass(frozen=True)
class RbdSource:
    """`source = "rbd:POOL/IMAGE"` with `ceph_conf`, `user` and `keyring`:
    the volume is a Ceph RBD image (docs/volumes.md). The image must exist
    (`rbd create`); its size is its own."""
    pool: str
    image: str
    ceph_conf: Path = Path("/etc/ceph/ceph.conf")
    user: str = "admin"              # the cephx client name without "client."
    keyring: Path | None = None      # None: the one ceph_conf names

    def __str__(self) -> str:
        return f"rbd:{self.pool}/{self.image}"


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
    qos: QosConfig = QosConfig()
    # A remote volume instead of `image` (`source`, at most one of these):
    # an NBD export (backends/nbd.py) or a Ceph RBD image (backends/rbd.py).
    nbd: NbdSource | None = None
    rbd: RbdSource | None = None
    # How long a request to a remote volume may wait for the server before
    # the guest gets an I/O error (docs/volumes.md).
    io_timeout: float = DEFAULT_IO_TIMEOUT

    @property
    def remote(self) -> NbdSource | RbdSource | None:
        return self.nbd or self.rbd


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
    vni: int | None = None  # set for a fleet VPC (from etcd), None for a local [[vpc]]


DEFAULT_LINKLOCAL_PPS = 1024


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
    # Frames per second to nitro's own services (ARP, DHCP, ICMP to the
    # gateway), as EC2's 1024 per ENI; 0: unlimited (docs/security.md).
    linklocal_pps: int = DEFAULT_LINKLOCAL_PPS


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
    engine: EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(default_workers(), None, None))
    fleet: FleetConfig | None = None

    def fleet_vpc_names(self) -> list[str]:
        """VPCs [[net]] entries name that no [[vpc]] defines: the fleet's,
        resolved from etcd at start-up (with_fleet_vpcs)."""
        local = {v.id for v in self.vpc}
        return list(dict.fromkeys(n.vpc for n in self.net if n.vpc not in local))


DEFAULT_LEASE_TTL = 10  # seconds: a dead host's entries are gone this long after it stopped
DEFAULT_REKEY_INTERVAL = 3600  # seconds a host sends under one key epoch (docs/fleet.md "Key schedule")
DEFAULT_UNDERLAY_MTU = 1500
_URL_RE = re.compile(r"^https?://[^/\s]+$")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """[fleet]: this host's place in a fleet whose state is in etcd
    (docs/fleet.md). Absent: a single host, nothing is read from etcd."""
    etcd: tuple[str, ...]          # client URLs, tried in order
    host: str                      # /nitro/hosts/<host>
    underlay: ipaddress.IPv4Address  # where other hosts send this host's tunnels
    key_file: Path                 # X25519 private key (nitro/fleet/keys.py reads or creates it)
    encrypt: bool = True           # ESP between hosts; false only to measure or debug
    lease_ttl: int = DEFAULT_LEASE_TTL
    rekey_interval: int = DEFAULT_REKEY_INTERVAL  # seconds between scheduled rekeys
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU      # the largest outer packet the underlay carries


def check_etcd_url(url: Any, file: str, key: str) -> str:
    """An etcd client URL, "http://10.0.0.1:2379" (no path)."""
    if not isinstance(url, str) or not _URL_RE.match(url):
        raise ConfigError(file, key, f"expected an etcd URL such as 'http://10.0.0.1:2379', got {url!r}")
    return url


MAX_WORKERS = 64  # NITRO_ENGINE_MAX_WORKERS
MAX_POLL_US = 1000  # NITRO_ENGINE_POLL_MAX_US


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """[daemon] workers / cpus / poll_us: the C worker threads that serve
    every ring (docs/architecture.md "The engine"); seccomp and
    max_guest_memory: what a hostile tenant is denied (docs/security.md)."""
    workers: int
    cpus: tuple[int, ...] | None  # worker i runs on cpus[i % len(cpus)]; None: not pinned
    poll_us: int | None           # busy-poll window; None: adaptive
    seccomp: bool = True          # workers confine themselves to the calls they make
    max_guest_memory: int | None = None  # bytes all guests' memory tables may map; None: no cap

    def worker_cpus(self) -> list[int] | None:
        if self.cpus is None:
            return None
        return [self.cpus[i % len(self.cpus)] for i in range(self.workers)]


def default_workers() -> int:
    """One worker per CPU nitro may run on (its affinity mask)."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6), as the kernel's cpulist format; ValueError."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        first, last = int(lo), int(hi) if dash else int(lo)
        if first < 0 or last < first:
            raise ValueError(f"bad range {part.strip()!r}")
        cpus.extend(range(first, last + 1))
    if not cpus or len(set(cpus)) != len(cpus):
        raise ValueError("empty or repeated CPUs")
    return tuple(cpus)


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
    if isinstance(value, str):
        value = _with_unit(value, _SIZE_UNITS, file, key, "a size such as '1G'")
    if not isinstance(value, int):
        raise ConfigError(file, key, f"expected a size such as '1G', got {value!r}")
    n = value
    if n <= 0 or n % 512:
        raise ConfigError(file, key, f"size must be a positive multiple of 512 bytes, got {n}")
    return n


def _with_unit(value: str, units: dict[str, int], file: str, key: str, what: str) -> int:
    """'10M' -> 10 * units['M']."""
    m = _UNIT_RE.match(value)
    if not m:
        raise ConfigError(file, key, f"expected {what}, got {value!r}")
    return int(m.group(1)) * units[m.group(2).upper()]


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
    _check_keys(doc, {"daemon", "metrics", "blk", "vpc", "net", "fleet"}, source, "")
    daemon = _table(doc, "daemon", source)
    _check_keys(daemon, {"runtime_dir", "state_dir", "control_socket", "log_level",
                         "workers", "cpus", "poll_us", "seccomp", "max_guest_memory"},
                source, "daemon.")
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
    blks = tuple(_blk(t, i, source, runtime, state) for i, t in enumerate(_array(doc, "blk", source)))
    vpcs = tuple(_vpc(t, i, source) for i, t in enumerate(_array(doc, "vpc", source, MAX_VPCS)))
    fleet = _fleet(doc["fleet"], source, state) if "fleet" in doc else None
    nets = tuple(_net(t, i, source, runtime, vpcs, fleet is not None)
                 for i, t in enumerate(_array(doc, "net", source, MAX_NET_INTERFACES)))
    _check_unique(blks, vpcs, nets, source)
    engine = _engine(daemon, source)
    return DaemonConfig(runtime, state, control, listen, level, blks, source, vpcs, nets, engine, fleet)


def _fleet(t: Any, source: str, state: Path) -> FleetConfig:
    if not isinstance(t, dict):
        raise ConfigError(source, "fleet", "expected a table")
    p = "fleet."
    _check_keys(t, {"etcd", "host", "underlay", "key_file", "encrypt", "lease_ttl", "rekey_interval",
                    "underlay_mtu"}, source, p)
    urls = t.get("etcd")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls:
        raise ConfigError(source, p + "etcd", 'expected a list of URLs such as ["http://10.0.0.1:2379"]')
    etcd = tuple(check_etcd_url(u, source, p + "etcd") for u in urls)
    host = _str(t, "host", source, p, None)
    if not _ID_RE.match(host):
        raise ConfigError(source, p + "host", f"must match {_ID_RE.pattern}, got {host!r}")
    underlay = _ipv4(t, "underlay", source, p, ipaddress.IPv4Address)
    if underlay.is_unspecified or underlay.is_multicast:
        raise ConfigError(source, p + "underlay", f"{underlay} cannot be a tunnel endpoint")
    key_file = state / _str(t, "key_file", source, p, "fleet.key")
    if key_file.is_dir():
        raise ConfigError(source, p + "key_file", f"{key_file} is a directory")
    if not key_file.parent.is_dir() and key_file.parent != state:
        raise ConfigError(source, p + "key_file", f"directory {key_file.parent} does not exist")
    encrypt = t.get("encrypt", True)
    if not isinstance(encrypt, bool):
        raise ConfigError(source, p + "encrypt", f"expected true or false, got {encrypt!r}")
    ttl = _int(t, "lease_ttl", source, p, DEFAULT_LEASE_TTL, 2, 3600)
    rekey = _int(t, "rekey_interval", source, p, DEFAULT_REKEY_INTERVAL, 1, 7 * 86400)
    mtu = _int(t, "underlay_mtu", source, p, DEFAULT_UNDERLAY_MTU, 576, 65535)
    return FleetConfig(etcd, host, underlay, key_file, encrypt, ttl, rekey, mtu)


def with_fleet_vpcs(cfg: DaemonConfig, vpcs: Sequence[VpcConfig]) -> DaemonConfig:
    """``cfg`` with the fleet VPCs its [[net]] entries name appended to its
    VPCs (after the local ones: their switch indices do not move), each
    interface checked against its VPC as a local one is. ConfigError when
    a named VPC is missing from ``vpcs`` or an address does not fit."""
    by_name = {v.id: v for v in vpcs}
    added = []
    for name in cfg.fleet_vpc_names():
        if name not in by_name:
            raise ConfigError(cfg.source, "net", f"vpc {name!r} is neither a [[vpc]] here nor a VPC of the fleet "
                              f"(have {sorted(by_name)})")
        added.append(by_name[name])
    if len(cfg.vpc) + len(added) > MAX_VPCS:
        raise ConfigError(cfg.source, "vpc", f"at most {MAX_VPCS} VPCs, local and fleet together")
    all_vpcs = {v.id: v for v in (*cfg.vpc, *added)}
    for i, n in enumerate(cfg.net):
        _check_net_ip(n.ip, all_vpcs[n.vpc], cfg.source, f"net[{i}].")
    return dataclasses.replace(cfg, vpc=(*cfg.vpc, *added))


def _engine(daemon: dict, source: str) -> EngineConfig:
    cpus = None
    if "cpus" in daemon:
        text = _str(daemon, "cpus", source, "daemon.", None)
        try:
            cpus = parse_cpu_list(text)
        except ValueError as e:
            raise ConfigError(source, "daemon.cpus", f"expected a CPU list like \"0-3,6\": {e}") from None
        usable = os.sched_getaffinity(0)
        if not set(cpus) <= usable:
            raise ConfigError(source, "daemon.cpus",
                              f"CPUs {sorted(set(cpus) - usable)} are not available to nitro "
                              f"(its CPUs: {sorted(usable)})")
    default = min(MAX_WORKERS, len(cpus)) if cpus else default_workers()
    workers = _int(daemon, "workers", source, "daemon.", default, 1, MAX_WORKERS)
    poll = daemon.get("poll_us", "adaptive")
    poll_us = None
    if poll != "adaptive":
        if isinstance(poll, bool) or not isinstance(poll, int) or not 0 <= poll <= MAX_POLL_US:
            raise ConfigError(source, "daemon.poll_us",
                              f'expected "adaptive" or microseconds 0..{MAX_POLL_US}, got {poll!r}')
        poll_us = poll
    seccomp = daemon.get("seccomp", True)
    if not isinstance(seccomp, bool):
        raise ConfigError(source, "daemon.seccomp", f"expected true or false, got {seccomp!r}")
    cap = None
    if "max_guest_memory" in daemon:
        cap = parse_size(daemon["max_guest_memory"], source, "daemon.max_guest_memory")
    return EngineConfig(workers, cpus, poll_us, seccomp, cap)


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _array(doc: dict, key: str, source: str, most: int | None = None) -> list:
    v = doc.get(key, [])
    if not isinstance(v, list):
        raise ConfigError(source, key, f"expected [[{key}]] tables")
    if most is not None and len(v) > most:
        raise ConfigError(source, key, f"at most {most} [[{key}]] tables, got {len(v)}")
    return v


def _entry(t: Any, i: int, kind: str, source: str, allowed: set[str]) -> str:
    """Check that [[kind]] number i is a table with known keys; its key prefix."""
    if not isinstance(t, dict):
        raise ConfigError(source, f"{kind}[{i}]", "expected a table")
    p = f"{kind}[{i}]."
    _check_keys(t, allowed, source, p)
    return p


def _id(t: dict, source: str, p: str) -> str:
    v = _str(t, "id", source, p, None)
    if not _ID_RE.match(v):
        raise ConfigError(source, p + "id", f"must match {_ID_RE.pattern}, got {v!r}")
    return v


def _queue_size(t: dict, source: str, p: str, least: int = 2) -> int:
    v = _int(t, "queue_size", source, p, 256, least, 1024)
    if v & (v - 1):
        raise ConfigError(source, p + "queue_size", f"must be a power of two, got {v}")
    return v


def _ipv4(t: dict, key: str, source: str, p: str, kind):
    v = _str(t, key, source, p, None)
    try:
        return kind(v)
    except ValueError as e:
        raise ConfigError(source, p + key, f"not an IPv4 {kind.__name__[4:].lower()}: {e}") from None


def _vpc(t: Any, i: int, source: str) -> VpcConfig:
    p = _entry(t, i, "vpc", source, {"id", "cidr", "gateway", "mtu", "dns", "lease_seconds", "uplink"})
    vpc_id = _id(t, source, p)
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
    if len(dns_v) > MAX_DNS:  # DHCP option 6 carries at most 255 bytes
        raise ConfigError(source, p + "dns", f"at most {MAX_DNS} servers, got {len(dns_v)}")
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


def _rate(t: dict, key: str, source: str, p: str, default: int = 0) -> int:
    """A rate limit: an integer or '10M' (decimal units, as line rates are)."""
    v = t.get(key, default)
    if isinstance(v, str):
        v = _with_unit(v, _RATE_UNITS, source, p + key, "a number such as 125000 or '10M'")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_RATE:
        raise ConfigError(source, p + key, f"expected an integer in 0..{MAX_RATE} (0: unlimited), got {v!r}")
    return v


def _net(t: Any, i: int, source: str, runtime: Path, vpcs: tuple[VpcConfig, ...], fleet: bool) -> NetConfig:
    p = _entry(t, i, "net", source, {"id", "socket", "vpc", "mac", "ip", "queues", "queue_size",
                                     "bw_in_bytes_per_sec", "bw_out_bytes_per_sec", "pps",
                                     "linklocal_pps"})
    dev_id = _id(t, source, p)
    vpc_id = _str(t, "vpc", source, p, None)
    vpc = next((v for v in vpcs if v.id == vpc_id), None)
    if vpc is None and not fleet:
        raise ConfigError(source, p + "vpc", f"no [[vpc]] with id {vpc_id!r} (have {[v.id for v in vpcs]})")
    if vpc is None and not _ID_RE.match(vpc_id):  # a fleet VPC's name, checked when etcd is read
        raise ConfigError(source, p + "vpc", f"must match {_ID_RE.pattern}, got {vpc_id!r}")
    mac = _str(t, "mac", source, p, None)
    if not _MAC_RE.match(mac):
        raise ConfigError(source, p + "mac", f"expected a MAC such as '52:54:00:12:34:56', got {mac!r}")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise ConfigError(source, p + "mac", f"{mac} is a multicast or zero address")
    ip = _ipv4(t, "ip", source, p, ipaddress.IPv4Address)
    if vpc is not None:
        _check_net_ip(ip, vpc, source, p)
    # QEMU's virtio-net-pci refuses rings smaller than 256 entries.
    qsize = _queue_size(t, source, p, least=256)
    return NetConfig(
        id=dev_id, socket=runtime / _str(t, "socket", source, p, f"{dev_id}.sock"),
        vpc=vpc_id, mac=mac.lower(), ip=ip,
        queues=_int(t, "queues", source, p, 1, 1, MAX_NET_QUEUE_PAIRS), queue_size=qsize,
        bw_in_bytes_per_sec=_rate(t, "bw_in_bytes_per_sec", source, p),
        bw_out_bytes_per_sec=_rate(t, "bw_out_bytes_per_sec", source, p),
        pps=_rate(t, "pps", source, p),
        linklocal_pps=_rate(t, "linklocal_pps", source, p, DEFAULT_LINKLOCAL_PPS))


def _check_net_ip(ip: ipaddress.IPv4Address, vpc: VpcConfig, source: str, p: str) -> None:
    if ip not in vpc.cidr or ip in (vpc.cidr.network_address, vpc.cidr.broadcast_address, vpc.gateway):
        raise ConfigError(source, p + "ip", f"{ip} is not a free host address of vpc {vpc.id} ({vpc.cidr})")
    if vpc.uplink is not None and ip == vpc.uplink.address.ip:
        raise ConfigError(source, p + "ip", f"{ip} is vpc {vpc.id}'s uplink address")


def _blk(t: Any, i: int, source: str, runtime: Path, state: Path) -> BlkConfig:
    p = _entry(t, i, "blk", source, {"id", "socket", "image", "size", "readonly", "queues",
                                     "queue_size", "serial", "encryption", "qos", "io_timeout",
                                     *SOURCE_KEYS})
    dev_id = _id(t, source, p)
    size = parse_size(t["size"], source, p + "size") if "size" in t else None
    queues = _int(t, "queues", source, p, 1, 1, MAX_QUEUES)
    qsize = _queue_size(t, source, p)
    serial = _str(t, "serial", source, p, dev_id)
    if len(serial.encode()) > 20:
        raise ConfigError(source, p + "serial", "at most 20 bytes (virtio-blk GET_ID)")
    readonly = t.get("readonly", False)
    if not isinstance(readonly, bool):
        raise ConfigError(source, p + "readonly", f"expected true or false, got {readonly!r}")
    blk = BlkConfig(
        id=dev_id,
        socket=runtime / _str(t, "socket", source, p, f"{dev_id}.sock"),
        image=state / _str(t, "image", source, p, f"{dev_id}.img"),
        size=size, readonly=readonly, queues=queues, queue_size=qsize, serial=serial,
        encryption=_encryption(t, source, p, state), qos=_qos(t, source, p),
        **_remote(t, source, p, state))
    return blk


def _qos(t: dict, source: str, prefix: str) -> QosConfig:
    if "qos" not in t:
        return QosConfig()
    q = t["qos"]
    if not isinstance(q, dict):
        raise ConfigError(source, prefix + "qos", "expected a table such as { iops = 2000, throughput = \"100M\" }")
    return parse_qos(q, QosConfig(), source, prefix + "qos.")


def parse_qos(values: dict, base: QosConfig, source: str, prefix: str = "") -> QosConfig:
    """``values`` (some of QOS_KEYS) over ``base`` -> checked QosConfig.
    Also what `nitro volume qos` sends: the keys it names change, the others
    stay. Rates take decimal units ('100M'); ConfigError names the key."""
    _check_keys(values, set(QOS_KEYS), source, prefix)
    merged = {k: getattr(base, k) for k in QOS_KEYS}
    for key in ("iops", "throughput", "burst_iops"):
        if key in values:
            merged[key] = _rate(values, key, source, prefix)
    if "burst_seconds" in values:
        merged["burst_seconds"] = _int(values, "burst_seconds", source, prefix, 0, 0, MAX_BURST_SECONDS)
    qos = QosConfig(**merged)
    if qos.burst_iops and not qos.iops:
        raise ConfigError(source, prefix + "burst_iops", "a burst needs a baseline: set iops too")
    if qos.burst_iops and qos.burst_iops <= qos.iops:
        raise ConfigError(source, prefix + "burst_iops",
                          f"must be above iops ({qos.iops}), got {qos.burst_iops}")
    if bool(qos.burst_iops) != bool(qos.burst_seconds):
        raise ConfigError(source, prefix + ("burst_seconds" if qos.burst_iops else "burst_iops"),
                          "burst_iops and burst_seconds go together (both 0: no burst)")
    return qos


# `source` and the keys that go with it: for any remote volume, an NBD
# export's (nbds:// only) and an RBD image's. The dict maps a key to the
# source kind it belongs to (None: either).
_REMOTE_KEYS: dict[str, str | None] = {
    "io_timeout": None,
    "tls_psk_file": "nbds", "tls_username": "nbds", "tls_certificates": "nbds",
    "ceph_conf": "rbd", "user": "rbd", "keyring": "rbd",
}
SOURCE_KEYS = ("source", *_REMOTE_KEYS)
_SOURCE_FORMS = {None: '"nbd://HOST[:PORT]/EXPORT", "nbds://..." or "rbd:POOL/IMAGE"',
                 "nbds": '"nbds://HOST[:PORT]/EXPORT"', "rbd": '"rbd:POOL/IMAGE"'}
_RBD_NAME_RE = re.compile(r"^[^/@\s]+$")


def _remote(t: dict, source: str, prefix: str, state: Path) -> dict[str, Any]:
    """`source` (a remote volume: an NBD export or an RBD image) and its
    keys -> BlkConfig's nbd or rbd and io_timeout; {} for a local image."""
    spec = _str(t, "source", source, prefix, None) if "source" in t else None
    scheme = spec.partition(":")[0].lower() if spec is not None else None
    if scheme is not None and scheme not in ("nbd", "nbds", "rbd"):
        raise ConfigError(source, prefix + "source",
                          f"expected nbd://HOST[:PORT]/EXPORT, nbds://... or rbd:POOL/IMAGE, got {spec!r}")
    for key, kind in _REMOTE_KEYS.items():
        if key in t and (scheme is None or kind not in (None, scheme)):
            raise ConfigError(source, prefix + key, f"only with source = {_SOURCE_FORMS[kind]}")
    if spec is None:
        return {}
    fields: dict[str, Any] = {"io_timeout": _io_timeout(t, source, prefix)}
    if scheme == "rbd":
        fields["rbd"] = _rbd_source(t, spec, source, prefix, state)
    else:
        fields["nbd"] = _nbd_source(t, spec, source, prefix, state)
    return fields


def parse_remote_source(values: dict[str, Any], source: str,
                        base: Path) -> NbdSource | RbdSource:
    """`source` and its keys (SOURCE_KEYS) as in a [[blk]] table, relative
    paths under `base`: how `nitro volume create` names a remote volume."""
    fields = _remote(values, source, "", base)
    if not fields:
        raise ConfigError(source, "source", f"expected {_SOURCE_FORMS[None]}")
    remote: NbdSource | RbdSource = fields.get("nbd") or fields["rbd"]
    return remote


def _io_timeout(t: dict, source: str, prefix: str) -> float:
    v = t.get("io_timeout", DEFAULT_IO_TIMEOUT)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= MAX_IO_TIMEOUT:
        raise ConfigError(source, prefix + "io_timeout", f"expected seconds in (0, {MAX_IO_TIMEOUT:g}], got {v!r}")
    return float(v)


def _nbd_source(t: dict, spec: str, source: str, prefix: str, state: Path) -> NbdSource:
    """`source = "nbd://..."` / `"nbds://..."` with its TLS keys."""
    from nitro.devices.blk.backends import nbd

    for key in ("image", "size"):
        if key in t:
            raise ConfigError(source, prefix + key, "not with source: the export is the volume")
    files = {k: state / _str(t, k, source, prefix, None)
             for k in ("tls_psk_file", "tls_certificates") if k in t}
    user = _str(t, "tls_username", source, prefix, None) if "tls_username" in t else None
    try:
        return nbd.parse_source(spec, tls_username=user, **files)
    except ValueError as e:
        raise ConfigError(source, prefix + "source", str(e)) from None


def _rbd_source(t: dict, spec: str, source: str, prefix: str, state: Path) -> RbdSource:
    """`source = "rbd:POOL/IMAGE"` with its options."""
    pool, _, image = spec.removeprefix("rbd:").partition("/")
    if not spec.startswith("rbd:") or not _RBD_NAME_RE.match(pool) or not _RBD_NAME_RE.match(image):
        raise ConfigError(source, prefix + "source", f'expected "rbd:POOL/IMAGE", got {spec!r}')
    for key, why in (("image", "the volume is the RBD image"),
                     ("size", "an RBD image's size is its own (rbd create/resize)")):
        if key in t:
            raise ConfigError(source, prefix + key, f"not with source: {why}")
    keyring = _str(t, "keyring", source, prefix, "")
    return RbdSource(pool=pool, image=image,
                     ceph_conf=state / _str(t, "ceph_conf", source, prefix, "/etc/ceph/ceph.conf"),
                     user=_str(t, "user", source, prefix, "admin"),
                     keyring=state / keyring if keyring else None)


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


def _check_unique(blks: tuple[BlkConfig, ...], vpcs: tuple[VpcConfig, ...],
                  nets: tuple[NetConfig, ...], source: str) -> None:
    """Device ids and sockets are unique across kinds; the rest per table."""
    blk = list(enumerate(blks))
    net = list(enumerate(nets))
    vpc = list(enumerate(vpcs))
    _no_duplicates(source, "id", [(f"blk[{i}].id", b.id) for i, b in blk]
                   + [(f"net[{i}].id", n.id) for i, n in net])
    _no_duplicates(source, "socket", [(f"blk[{i}].socket", b.socket) for i, b in blk]
                   + [(f"net[{i}].socket", n.socket) for i, n in net])
    _no_duplicates(source, "image", [(f"blk[{i}].image", b.image) for i, b in blk
                                     if b.remote is None])
    _no_duplicates(source, "source", [(f"blk[{i}].source", str(b.remote)) for i, b in blk
                                      if b.remote is not None])
    _no_duplicates(source, "id", [(f"vpc[{i}].id", v.id) for i, v in vpc])
    _no_duplicates(source, "interface", [(f"vpc[{i}].uplink.name", v.uplink.name)
                                         for i, v in vpc if v.uplink is not None])
    _no_duplicates(source, "mac", [(f"net[{i}].mac", n.mac) for i, n in net])
    _no_duplicates(source, "ip", [(f"net[{i}].ip", (n.vpc, n.ip)) for i, n in net])


def _no_duplicates(source: str, what: str, keyed: list[tuple[str, Any]]) -> None:
    seen: set = set()
    for key, value in keyed:
        if value in seen:
            shown = f"{value[1]} in vpc {value[0]}" if isinstance(value, tuple) else repr(str(value))
            raise ConfigError(source, key, f"duplicate {what} {shown}")
        seen.add(value)


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
