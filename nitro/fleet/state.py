"""FleetState: what etcd says about the fleet, as one host sees it (sans-IO).

The reducer takes a snapshot (every key under /nitro/ at a revision) or
watch events, updates three tables (hosts, vpcs, interfaces) and derives
the two views the datapath needs:

- ``peers``: every *other* host, by id -> its HostRecord (underlay address
  and X25519 public key: the pair's keys are derived from it);
- ``remotes``: every interface that lives on another host whose host record
  and VPC are known, by (vpc, ip) -> :class:`Remote` (what the switch's
  remote table holds: VNI, MAC, the host and its underlay address and key).

Each ``load``/``apply`` returns the :class:`Change` list of those views and
of ``vpcs`` (old -> new, None for absent), so a listener updates its tables
by difference and never rebuilds them. An interface whose host's lease
expired disappears from ``remotes`` with its host even before etcd deletes
the interface keys (they share the lease, so etcd deletes them together).

A value that does not follow nitro/fleet/schema.py is skipped (and any
previous value of that key forgotten), counted in ``invalid`` with the
last reason in ``last_invalid``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from typing import Any

from nitro.fleet import schema
from nitro.fleet.etcd_codec import EventType, KeyValue, WatchEvent
from nitro.fleet.schema import HostRecord, InterfaceRecord, RecordError, VpcRecord

__all__ = ["Change", "FleetState", "Remote"]


@dataclasses.dataclass(frozen=True)
class Remote:
    """An interface on another host: where the switch sends its frames."""
    vpc: str
    vni: int
    ip: ipaddress.IPv4Address
    mac: str
    host: str
    underlay: ipaddress.IPv4Address
    public_key: bytes


@dataclasses.dataclass(frozen=True)
class Change:
    """One entry of a derived view that changed. ``view`` is "peers"
    (key: host id, values HostRecord), "vpcs" (key: name, VpcRecord) or
    "remotes" (key: (vpc, ip), Remote). ``old`` None: added; ``new``
    None: removed; both: replaced."""
    view: str
    key: Any
    old: Any
    new: Any

    @property
    def kind(self) -> str:
        return "add" if self.old is None else "remove" if self.new is None else "update"


VIEWS = ("peers", "vpcs", "remotes")


class FleetState:
    def __init__(self, self_host: str) -> None:
        self.self_host = self_host
        self.revision = 0  # every event up to this revision is applied
        self.hosts: dict[str, HostRecord] = {}
        self.vpcs: dict[str, VpcRecord] = {}
        self.interfaces: dict[tuple[str, ipaddress.IPv4Address], InterfaceRecord] = {}
        self.invalid = 0
        self.last_invalid = ""
        self._views: dict[str, dict] = {v: {} for v in VIEWS}

    # -- derived views --------------------------------------------------------------
    @property
    def peers(self) -> dict[str, HostRecord]:
        return self._views["peers"]

    @property
    def remotes(self) -> dict[tuple[str, ipaddress.IPv4Address], Remote]:
        return self._views["remotes"]

    def local_interfaces(self) -> list[InterfaceRecord]:
        return [i for i in self.interfaces.values() if i.host == self.self_host]

    def _derive(self) -> dict[str, dict]:
        peers = {h: r for h, r in self.hosts.items() if h != self.self_host}
        remotes = {}
        for key, i in self.interfaces.items():
            host, vpc = peers.get(i.host), self.vpcs.get(i.vpc)
            if host is None or vpc is None:
                continue  # our own, or its host (or VPC) is gone: nowhere to send
            remotes[key] = Remote(i.vpc, vpc.vni, i.ip, i.mac, i.host, host.underlay, host.public_key)
        return {"peers": peers, "vpcs": dict(self.vpcs), "remotes": remotes}

    def _diff(self) -> list[Change]:
        new = self._derive()
        changes = []
        for view in VIEWS:
            old_v, new_v = self._views[view], new[view]
            for key in old_v.keys() | new_v.keys():
                before, after = old_v.get(key), new_v.get(key)
                if before != after:
                    changes.append(Change(view, key, before, after))
        self._views = new
        return sorted(changes, key=_change_order)

    # -- the reducer ----------------------------------------------------------------
    def load(self, kvs: Iterable[KeyValue], revision: int) -> list[Change]:
        """Replace everything with a snapshot taken at ``revision`` (the first
        load, or a reload after the watch's revision was compacted)."""
        self.hosts, self.vpcs, self.interfaces = {}, {}, {}
        for kv in kvs:
            self._put(kv.key, kv.value)
        self.revision = revision
        return self._diff()

    def apply(self, events: Iterable[WatchEvent]) -> list[Change]:
        """Apply watch events (in revision order); events at or below the
        current revision were already applied and are ignored."""
        for e in events:
            if e.revision and e.revision <= self.revision:
                continue
            if e.type is EventType.PUT:
                self._put(e.kv.key, e.kv.value)
            else:
                self._delete(e.kv.key)
            self.revision = max(self.revision, e.revision)
        return self._diff()

    def advance(self, revision: int) -> None:
        """Every event up to ``revision`` has been seen (a watch header)."""
        self.revision = max(self.revision, revision)

    def _table(self, kind: str) -> dict | None:
        tables: dict[str, dict] = {"host": self.hosts, "vpc": self.vpcs, "interface": self.interfaces}
        return tables.get(kind)

    def _put(self, key: bytes, value: bytes) -> None:
        try:
            kind, ident = schema.decode_key(key)
            record = schema.decode_value(kind, ident, value)
        except RecordError as e:
            self._invalid(key, e)
            self._delete(key)
            return
        table = self._table(kind)
        if table is not None:  # /nitro/vnis/ and /nitro/index/ only keep numbers unique
            table[ident] = record

    def _delete(self, key: bytes) -> None:
        try:
            kind, ident = schema.decode_key(key)
        except RecordError:
            return
        table = self._table(kind)
        if table is not None:
            table.pop(ident, None)

    def _invalid(self, key: bytes, e: Exception) -> None:
        self.invalid += 1
        self.last_invalid = f"{key.decode(errors='replace')}: {e}"

    def statistics(self) -> dict:
        return {"revision": self.revision, "hosts": len(self.hosts), "peers": len(self.peers),
                "vpcs": len(self.vpcs), "interfaces": len(self.interfaces), "remotes": len(self.remotes),
                "invalid_records": self.invalid, "last_invalid": self.last_invalid}


def _change_order(c: Change) -> tuple:
    """Remotes withdrawn first, then peers and VPCs, then remotes added or
    replaced: a listener never holds a remote whose peer or VPC it has
    not got (a moved IP is withdrawn, then announced)."""
    if c.view == "remotes":
        rank = 0 if c.new is None else 3
    else:
        rank = 1 if c.view == "peers" else 2
    return (rank, str(c.key))
