"""The fleet's keys and values in etcd (docs/fleet.md "etcd schema"), sans-IO.

    /nitro/hosts/<host>              HostRecord       held by the host's lease
    /nitro/index/<n>                 the host's id    claims host index n (no lease: kept for good)
    /nitro/vpcs/<vpc>                VpcRecord        written by `nitro vpc create`
    /nitro/vnis/<vni>                the VPC's name   makes a VNI unique (same txn)
    /nitro/interfaces/<vpc>/<ip>     InterfaceRecord  held by its host's lease
    /nitro/volumes/<volume, escaped> VolumeLockRecord held by its host's lease: the volume is
                                                      attached there (nitro/fleet/volume_lock.py)

Values are JSON objects with ``"version": 1``. A reader refuses a record
whose version it does not know, or whose fields do not validate, with
:class:`RecordError` (the fleet state skips such a key and counts it): one
bad writer cannot make the other hosts crash or route to garbage.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import json
import re
from typing import Any
from urllib.parse import quote, unquote

__all__ = [
    "HostRecord",
    "InterfaceRecord",
    "RecordError",
    "VolumeLockRecord",
    "VpcRecord",
    "decode_key",
    "decode_value",
]

PREFIX = "/nitro/"
HOSTS = PREFIX + "hosts/"
VPCS = PREFIX + "vpcs/"
VNIS = PREFIX + "vnis/"
INDEXES = PREFIX + "index/"
INTERFACES = PREFIX + "interfaces/"
VOLUMES = PREFIX + "volumes/"
SCHEMA_VERSION = 1

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # as config.py's ids
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_VNI = (1 << 24) - 1  # RFC 8926: 24 bits
MAX_HOST_INDEX = (1 << 24) - 1  # the high 24 bits of an SPI (nitro/fleet/keys.py)
MAX_EPOCH = (1 << 32) - 1  # the SA's epoch in the C tunnel is 32 bits
X25519_KEY_BYTES = 32


class RecordError(ValueError):
    """A key or value in /nitro/ that does not follow the schema."""


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RecordError(f"{what} must match {NAME_RE.pattern}, got {value!r}")
    return value


def _ipv4(value: Any, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise RecordError(f"{what} is not an IPv4 address: {value!r}") from None


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RecordError(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _load(value: bytes) -> dict:
    try:
        doc = json.loads(value)
    except ValueError as e:
        raise RecordError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RecordError("not a JSON object")
    if doc.get("version") != SCHEMA_VERSION:
        raise RecordError(f"unknown schema version {doc.get('version')!r} (this nitro reads {SCHEMA_VERSION})")
    return doc


def _dump(fields: dict) -> bytes:
    return json.dumps({"version": SCHEMA_VERSION, **fields}, sort_keys=True, separators=(",", ":")).encode()


def check_cidr(text: Any) -> ipaddress.IPv4Network:
    """A VPC's CIDR: an IPv4 network with room for hosts (at most /30),
    written without host bits."""
    try:
        cidr = ipaddress.IPv4Network(text, strict=True)
    except (ValueError, TypeError) as e:
        raise RecordError(f"not an IPv4 network such as '10.0.0.0/24': {e}") from None
    if cidr.prefixlen > 30:
        raise RecordError(f"prefix /{cidr.prefixlen} leaves no room for hosts (at most /30)")
    return cidr


@dataclasses.dataclass(frozen=True)
class HostRecord:
    """``/nitro/hosts/<id>``: where a host's tunnels end, its key, its
    fleet-unique index (the high bits of its SPIs) and the key epoch it
    sends under (docs/fleet.md "Key schedule")."""
    id: str
    underlay: ipaddress.IPv4Address
    public_key: bytes  # X25519, 32 bytes (base64 in JSON)
    index: int
    epoch: int = 0

    def __post_init__(self) -> None:
        _int(self.index, "index", 1, MAX_HOST_INDEX)
        _int(self.epoch, "epoch", 0, MAX_EPOCH)

    @property
    def key(self) -> bytes:
        return (HOSTS + self.id).encode()

    def encode(self) -> bytes:
        return _dump({"id": self.id, "underlay": str(self.underlay),
                      "public_key": base64.b64encode(self.public_key).decode(),
                      "index": self.index, "epoch": self.epoch})

    @classmethod
    def decode(cls, host_id: str, value: bytes) -> HostRecord:
        doc = _load(value)
        if doc.get("id") != host_id:
            raise RecordError(f"id {doc.get('id')!r} is not the key's {host_id!r}")
        try:
            key = base64.b64decode(doc.get("public_key", ""), validate=True)
        except (binascii.Error, TypeError):
            raise RecordError("public_key is not base64") from None
        if len(key) != X25519_KEY_BYTES:
            raise RecordError(f"public_key must be {X25519_KEY_BYTES} bytes, got {len(key)}")
        return cls(host_id, _ipv4(doc.get("underlay"), "underlay"), key, doc.get("index"),  # type: ignore[arg-type]
                   doc.get("epoch"))  # type: ignore[arg-type]


def index_key(index: int) -> bytes:
    """``/nitro/index/<n>``: whose host index n is (its value: the host id)."""
    return f"{INDEXES}{_int(index, 'index', 1, MAX_HOST_INDEX)}".encode()


@dataclasses.dataclass(frozen=True)
class VpcRecord:
    """``/nitro/vpcs/<name>``: a VPC of the fleet."""
    name: str
    cidr: ipaddress.IPv4Network
    vni: int
    gateway: ipaddress.IPv4Address
    mtu: int = 1500
    dns: tuple[ipaddress.IPv4Address, ...] = ()

    def __post_init__(self) -> None:
        _name(self.name, "VPC name")
        check_cidr(str(self.cidr))
        _int(self.vni, "vni", 1, MAX_VNI)
        _int(self.mtu, "mtu", 576, 9000)
        if self.gateway not in self.cidr or self.gateway in (self.cidr.network_address,
                                                             self.cidr.broadcast_address):
            raise RecordError(f"gateway {self.gateway} is not a host address of {self.cidr}")

    @property
    def key(self) -> bytes:
        return (VPCS + self.name).encode()

    @property
    def vni_key(self) -> bytes:
        return vni_key(self.vni)

    def encode(self) -> bytes:
        return _dump({"name": self.name, "cidr": str(self.cidr), "vni": self.vni, "mtu": self.mtu,
                      "gateway": str(self.gateway), "dns": [str(d) for d in self.dns]})

    @classmethod
    def decode(cls, name: str, value: bytes) -> VpcRecord:
        doc = _load(value)
        if doc.get("name") != name:
            raise RecordError(f"name {doc.get('name')!r} is not the key's {name!r}")
        dns = doc.get("dns", [])
        if not isinstance(dns, list):
            raise RecordError(f"dns must be a list of addresses, got {dns!r}")
        return cls(name, check_cidr(doc.get("cidr")), doc.get("vni"),  # type: ignore[arg-type]
                   _ipv4(doc.get("gateway"), "gateway"), doc.get("mtu", 1500),
                   tuple(_ipv4(d, "dns") for d in dns))


def vni_key(vni: int) -> bytes:
    return f"{VNIS}{vni}".encode()


@dataclasses.dataclass(frozen=True)
class InterfaceRecord:
    """``/nitro/interfaces/<vpc>/<ip>``: a guest interface and its host."""
    vpc: str
    ip: ipaddress.IPv4Address
    mac: str  # lower case, "52:54:00:12:34:56"
    host: str

    @property
    def key(self) -> bytes:
        return f"{INTERFACES}{self.vpc}/{self.ip}".encode()

    def encode(self) -> bytes:
        return _dump({"vpc": self.vpc, "ip": str(self.ip), "mac": self.mac, "host": self.host})

    @classmethod
    def decode(cls, vpc: str, ip: ipaddress.IPv4Address, value: bytes) -> InterfaceRecord:
        doc = _load(value)
        if doc.get("vpc") != vpc or doc.get("ip") != str(ip):
            raise RecordError(f"vpc/ip {doc.get('vpc')!r}/{doc.get('ip')!r} are not the key's {vpc}/{ip}")
        mac = doc.get("mac")
        if not isinstance(mac, str) or not MAC_RE.match(mac):
            raise RecordError(f"mac must be lower-case 'xx:xx:xx:xx:xx:xx', got {mac!r}")
        return cls(vpc, ip, mac, _name(doc.get("host"), "host"))


def interfaces_prefix(vpc: str) -> bytes:
    return f"{INTERFACES}{vpc}/".encode()


def volume_key(volume: str) -> bytes:
    """``/nitro/volumes/<volume>`` with the volume's canonical name
    (``nbd://host:port/export``) percent-escaped whole: one path segment,
    no "/" of the URL in the key."""
    if not volume:
        raise RecordError("empty volume name")
    return f"{VOLUMES}{quote(volume, safe='')}".encode()


@dataclasses.dataclass(frozen=True)
class VolumeLockRecord:
    """``/nitro/volumes/<volume>``: the volume is attached on ``host``, as
    its [[blk]] ``device``. An advisory lock: nitro takes it before a
    device on the volume serves and never writes a volume another host's
    record names (docs/volumes.md "One host at a time")."""
    volume: str
    host: str
    device: str

    def __post_init__(self) -> None:
        _name(self.host, "host")
        _name(self.device, "device")

    @property
    def key(self) -> bytes:
        return volume_key(self.volume)

    def encode(self) -> bytes:
        return _dump({"volume": self.volume, "host": self.host, "device": self.device})

    @classmethod
    def decode(cls, volume: str, value: bytes) -> VolumeLockRecord:
        doc = _load(value)
        if doc.get("volume") != volume:
            raise RecordError(f"volume {doc.get('volume')!r} is not the key's {volume!r}")
        return cls(volume, doc.get("host"), doc.get("device"))  # type: ignore[arg-type]


# What a key under /nitro/ names: ("host", id), ("vpc", name), ("vni", n),
# ("interface", (vpc, ip)), ("index", n), ("volume", name).
Key = tuple[str, Any]


def decode_key(key: bytes) -> Key:
    """Which record a key holds; RecordError for a key outside the schema."""
    try:
        text = key.decode()
    except UnicodeDecodeError:
        raise RecordError(f"key {key!r} is not UTF-8") from None
    if text.startswith(HOSTS):
        return "host", _name(text[len(HOSTS):], "host id")
    if text.startswith(VPCS):
        return "vpc", _name(text[len(VPCS):], "VPC name")
    if text.startswith(INDEXES):
        n = text[len(INDEXES):]
        return "index", _int(int(n) if n.isdigit() else None, "host index", 1, MAX_HOST_INDEX)
    if text.startswith(VNIS):
        return "vni", _int(int(text[len(VNIS):]) if text[len(VNIS):].isdigit() else None, "vni", 1, MAX_VNI)
    if text.startswith(INTERFACES):
        vpc, sep, ip = text[len(INTERFACES):].partition("/")
        if not sep:
            raise RecordError(f"key {text!r}: expected {INTERFACES}<vpc>/<ip>")
        return "interface", (_name(vpc, "VPC name"), _ipv4(ip, "interface ip"))
    if text.startswith(VOLUMES):
        escaped = text[len(VOLUMES):]
        if not escaped or "/" in escaped:
            raise RecordError(f"key {text!r}: expected {VOLUMES}<escaped volume name>")
        return "volume", unquote(escaped)
    raise RecordError(f"key {text!r} is not part of the schema")


def decode_value(kind: str, ident: Any, value: bytes) -> Any:
    """The record a value holds under a key decoded by decode_key."""
    if kind == "host":
        return HostRecord.decode(ident, value)
    if kind == "vpc":
        return VpcRecord.decode(ident, value)
    if kind == "interface":
        vpc, ip = ident
        return InterfaceRecord.decode(vpc, ip, value)
    if kind == "vni":
        return _name(value.decode(errors="replace"), "VPC name of a VNI")
    if kind == "index":
        return _name(value.decode(errors="replace"), "host id of a host index")
    if kind == "volume":
        return VolumeLockRecord.decode(ident, value)
    raise RecordError(f"unknown record kind {kind!r}")  # pragma: no cover - decode_key's kinds
