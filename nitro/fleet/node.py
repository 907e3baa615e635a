"""The daemon's side of the fleet: what [fleet] turns into at start-up.

- :func:`resolve_vpcs`: the VPCs [[net]] entries name that the config does
  not define are read from etcd once, before the switch is built (their
  CIDR, gateway, MTU and DNS are what the switch and DHCP serve);
- :func:`resolve_identity`: this host's index (claimed in etcd) and the
  epoch it starts sending under (nitro/fleet/identity.py), before any
  tunnel exists;
- :func:`open_node`: the :class:`FleetNode`, this host in the fleet: the
  FleetAgent that registers it and watches etcd, the FleetTunnel that holds
  its SAs, the TunnelSync between them, and the rekey schedule.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from nitro import _datapath, config
from nitro.config import DaemonConfig, VpcConfig
from nitro.control.protocol import CommandRefused
from nitro.crypto.keys import KeyMaterialError
from nitro.devices.net.underlay import Underlay
from nitro.fleet import identity, keys, schema
from nitro.fleet.agent import FleetAgent, OnChange
from nitro.fleet.etcd import EtcdClient
from nitro.fleet.etcd_codec import EtcdError
from nitro.fleet.schema import InterfaceRecord, RecordError, VpcRecord
from nitro.fleet.state import Change, FleetState
from nitro.fleet.sync import TunnelSync, rekey_reason
from nitro.fleet.tunnel import FleetTunnel, start_epoch
from nitro.log import log_event

__all__ = ["FleetNode", "FleetStartupError", "Identity", "RekeyRefused", "load_public_key", "open_node",
           "resolve_identity", "resolve_vpcs", "vpc_config"]

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT = 10.0  # seconds to read the VPCs at start-up before giving up
VPC_COPY_FILE = "fleet-vpcs.json"  # in the state directory: the VPCs as last read from etcd


class FleetStartupError(Exception):
    """The fleet part of the config cannot be set up (etcd unreachable at
    start-up while a [[net]] needs a fleet VPC, a VPC missing, a key file
    unreadable). One line; the daemon exits before serving."""


def vpc_config(v: VpcRecord) -> VpcConfig:
    return VpcConfig(v.name, v.cidr, v.gateway, v.mtu, v.dns, vni=v.vni)


async def fetch_vpcs(endpoints: Sequence[str], names: Sequence[str], request_timeout: float) -> list[VpcRecord]:
    out = []
    async with EtcdClient(endpoints, timeout=request_timeout) as etcd:
        for name in names:
            kv = await etcd.get(f"{schema.VPCS}{name}".encode())
            if kv is None:
                continue  # with_fleet_vpcs names it
            try:
                out.append(VpcRecord.decode(name, kv.value))
            except RecordError as e:
                raise FleetStartupError(f"fleet VPC {name} in etcd is unreadable: {e}") from None
    return out


def save_vpc_copy(path: Path, records: Sequence[VpcRecord]) -> None:
    """Keep the VPC records read from etcd in the state directory, for a
    start while etcd is away (a lost copy only costs that)."""
    doc = {r.name: json.loads(r.encode()) for r in records}
    try:
        identity.write_atomically(path, json.dumps(doc, sort_keys=True).encode() + b"\n")
    except OSError as e:
        log_event(log, logging.WARNING, "fleet: cannot keep a copy of the VPCs", path=str(path), error=e.strerror)


def load_vpc_copy(path: Path) -> dict[str, VpcRecord]:
    """The records save_vpc_copy kept; {} when missing or unreadable."""
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return {name: VpcRecord.decode(name, json.dumps(v).encode()) for name, v in doc.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecordError) as e:
        log_event(log, logging.WARNING, "fleet: the copy of the VPCs is unreadable", path=str(path), error=str(e))
        return {}


def resolve_vpcs(cfg: DaemonConfig) -> DaemonConfig:
    """``cfg`` with the fleet VPCs its interfaces need (config.with_fleet_vpcs),
    read from etcd, or, while etcd is unreachable, from the copy the last
    start kept in the state directory (the agent follows etcd once it is
    back). Blocking: call it before the daemon's trio loop runs."""
    names = cfg.fleet_vpc_names()
    if not names:
        return cfg
    assert cfg.fleet is not None, "config.load accepts such [[net]] only with [fleet]"
    copy = cfg.state_dir / VPC_COPY_FILE
    try:
        records = trio.run(fetch_vpcs, cfg.fleet.etcd, names, RESOLVE_TIMEOUT / 2)
        save_vpc_copy(copy, records)
    except EtcdError as e:
        kept = load_vpc_copy(copy)
        missing = [n for n in names if n not in kept]
        if missing:
            raise FleetStartupError(
                f"cannot read the fleet VPCs {', '.join(names)} from etcd: {e}; the state directory "
                f"has no copy of {', '.join(missing)} (a host's first start with them needs etcd)") from None
        log_event(log, logging.WARNING, "fleet: etcd unreachable; starting with the VPCs as this host "
                  "last read them", vpcs=",".join(names), copy=str(copy), error=str(e))
        records = [kept[n] for n in names]
    try:
        return config.with_fleet_vpcs(cfg, [vpc_config(r) for r in records])
    except config.ConfigError as e:
        raise FleetStartupError(f"config {e}") from None


def local_interfaces(cfg: DaemonConfig) -> list[InterfaceRecord]:
    """This host's interfaces in fleet VPCs: what it publishes."""
    assert cfg.fleet is not None
    fleet_vpcs = {v.id for v in cfg.vpc if v.vni is not None}
    return [InterfaceRecord(n.vpc, n.ip, n.mac, cfg.fleet.host) for n in cfg.net if n.vpc in fleet_vpcs]


def load_public_key(key_file: Path) -> bytes:
    """This host's X25519 public key. The private key file (32 raw bytes,
    mode 0600: nitro/fleet/keys.py) is created on the first start; the
    private half never leaves it except into C-held memory."""
    try:
        if not key_file.exists():
            public = keys.generate_private_key(key_file)
            log_event(log, logging.INFO, "created the fleet key pair", key_file=str(key_file))
            return public
        secret = keys.load_private_key(key_file)
        try:
            return keys.public_key(secret)
        finally:
            secret.close()
    except (keys.FleetKeyError, KeyMaterialError) as e:
        raise FleetStartupError(f"fleet key_file: {e}") from None


@dataclasses.dataclass(frozen=True)
class Identity:
    """This host's index and the epoch it starts sending under."""
    index: int
    epoch: int


async def _claim(endpoints: Sequence[str], host: str, wanted: int | None,
                 request_timeout: float) -> tuple[int, int | None]:
    async with EtcdClient(endpoints, timeout=request_timeout) as etcd:
        index = await identity.claim_index(etcd, host, wanted)
        return index, await identity.read_published_epoch(etcd, host)


def resolve_identity(cfg: DaemonConfig) -> Identity:
    """Claim (or get back) the host index in etcd and choose the start
    epoch: past the last one in the state directory and in etcd, at least
    the Unix time. Both are written to the state directory before any
    packet is sent. With etcd unreachable a host that has an index in its
    state directory starts with it (the agent checks it later); one that
    has none cannot start. Blocking: call it before the trio loop runs."""
    assert cfg.fleet is not None
    host = cfg.fleet.host
    path = cfg.state_dir / identity.STATE_FILE
    local = identity.load_local(path, host)
    try:
        index, etcd_epoch = trio.run(_claim, cfg.fleet.etcd, host, local.index, RESOLVE_TIMEOUT / 2)
    except EtcdError as e:
        if local.index is None:
            raise FleetStartupError(f"cannot claim a fleet host index in etcd: {e}") from None
        log_event(log, logging.WARNING, "fleet: etcd unreachable; starting with the host index of the "
                  "state directory", index=local.index, error=str(e))
        index, etcd_epoch = local.index, None
    except identity.IdentityError as e:
        raise FleetStartupError(str(e)) from None
    if local.index is not None and local.index != index:
        log_event(log, logging.WARNING, "fleet: etcd gives this host another index than its state directory",
                  was=local.index, index=index)
    known = [e for e in (local.epoch, etcd_epoch) if e is not None]
    epoch = start_epoch(max(known) if known else None, time.time())
    try:
        identity.save_local(path, identity.LocalState(host, index, epoch))
    except identity.IdentityError as e:
        raise FleetStartupError(str(e)) from None
    return Identity(index, epoch)


class RekeyRefused(CommandRefused):
    """A rekey that was not done (encryption off, the current epoch not in
    etcd yet, the state file not writable); the epoch did not move."""


REKEY_CHECK = 1.0  # seconds between looks at the rekey schedule (at most)
PUBLISH_TIMEOUT = 5.0  # seconds `nitro fleet rekey` waits for etcd to hold the new epoch


class FleetNode:
    """This host in the fleet, as the daemon holds it (``Daemon.fleet_node``):

    - ``agent``: the FleetAgent (etcd: registration, watch, ``agent.state``);
    - ``tunnel``: the FleetTunnel; ``tunnel.tunnel`` is the C tunnel
      (nitro._datapath.Tunnel) the switch sends through, and
      ``tunnel.slot(host)`` the peer slot of a host;
    - ``sync``: the TunnelSync that keeps the tunnel, and the switch's side
      once an Underlay is attached (:meth:`attach_underlay`), equal to the
      fleet state;
    - ``underlay``: that Underlay, or None (no [[net]] in a fleet VPC here,
      or not yet / no longer).

    Each change the agent reports is applied by ``sync`` (in the order the
    state gives: peers and VNIs exist before any remote that needs them),
    then handed to ``listener``."""

    def __init__(self, agent: FleetAgent, tunnel: FleetTunnel, sync: TunnelSync, state_path: Path, *,
                 rekey_interval: float, listener: OnChange | None = None) -> None:
        self.agent = agent
        self.tunnel = tunnel
        self.sync = sync
        self.state_path = state_path
        self.rekey_interval = rekey_interval
        self.listener = listener
        self.rekeys = 0
        self.last_rekey_reason = ""
        self.epoch_since = time.monotonic()  # when this host began sending under its epoch
        self.underlay: Underlay | None = None
        agent.on_change = self.on_change

    def attach_underlay(self, underlay: Underlay) -> None:
        """The switch's side follows the fleet state from now on. Trio thread."""
        self.sync.attach(underlay, self.agent.state)
        self.underlay = underlay

    def detach_underlay(self) -> Underlay | None:
        """Stop feeding the switch; the Underlay, for its owner to close."""
        self.underlay = None
        return self.sync.detach()

    def on_change(self, changes: Sequence[Change], state: FleetState) -> None:
        self.sync.apply(changes)
        if self.listener is not None:
            self.listener(changes, state)

    @property
    def epoch(self) -> int:
        return self.tunnel.epoch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The agent, and the rekey schedule; until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.agent.run)
            if self.tunnel.encrypt:
                nursery.start_soon(self._rekey_loop)
            task_status.started()

    async def _rekey_loop(self) -> None:
        while True:
            await trio.sleep(min(REKEY_CHECK, self.rekey_interval / 4))
            reason = rekey_reason(time.monotonic(), self.epoch_since, self.rekey_interval,
                                  self.tunnel.rekey_wanted())
            if reason is None or not self.agent.record_published:
                continue  # peers must know the epoch before this host moves past it
            try:
                self.rekey(reason)
            except RekeyRefused as e:
                log_event(log, logging.WARNING, "fleet rekey not done", reason=reason, error=str(e))

    def rekey(self, reason: str) -> dict[str, Any]:
        """Move to the next epoch now: write it to the state directory, send
        under it, publish it (the agent puts the record as soon as etcd
        answers). Peers already hold its inbound SA (E+1 of the epoch they
        know), so nothing is dropped. Refused while the current epoch is not
        in etcd: peers would not follow a second move. Trio thread only."""
        old = self.tunnel.epoch
        if not self.tunnel.encrypt:
            raise RekeyRefused("encryption is off ([fleet] encrypt = false): there are no keys to renew")
        if not self.agent.record_published:
            raise RekeyRefused(f"epoch {old} is not in etcd yet ({self.agent.etcd_state}): "
                               "peers could not follow a second move; retry when etcd is up")
        new = old + 1
        try:
            identity.save_local(self.state_path, identity.LocalState(self.agent.record.id,
                                                                     self.agent.record.index, new))
        except identity.IdentityError as e:
            raise RekeyRefused(str(e)) from None
        self.tunnel.set_epoch(new)
        self.agent.set_epoch(new)
        self.rekeys += 1
        self.last_rekey_reason = reason
        self.epoch_since = time.monotonic()
        log_event(log, logging.INFO, "fleet rekey", host=self.agent.record.id, reason=reason,
                  old_epoch=old, epoch=new)
        return {"host": self.agent.record.id, "old_epoch": old, "epoch": new, "reason": reason}

    async def rekey_and_publish(self, reason: str) -> dict[str, Any]:
        """:meth:`rekey`, then wait up to PUBLISH_TIMEOUT s for etcd to hold
        the new epoch; ``published`` says whether it did."""
        result = self.rekey(reason)
        with trio.move_on_after(PUBLISH_TIMEOUT):
            await self.agent.wait_published()
        return {**result, "published": self.agent.record_published}

    def statistics(self) -> dict[str, Any]:
        """The agent's statistics plus the keys': epoch, rekeys, one entry
        per peer's SAs (``sas``), and the Underlay's (``datapath``: its
        address and ring, per-peer packets, bytes and drops) while one is
        attached. Any thread (metrics)."""
        sas = []
        for e in self.tunnel.sa_statistics():
            sas.append({"peer": e["peer"], "index": e["index"], "peer_epoch": e["peer_epoch"],
                        "inbound_epochs": e["inbound_epochs"], "out": e["out"], "in": e["in"]})
        underlay = self.underlay
        return {**self.agent.statistics(), "encrypt": self.tunnel.encrypt, "rekeys": self.rekeys,
                "rekey_interval": self.rekey_interval, "last_rekey_reason": self.last_rekey_reason,
                "epoch_age_seconds": round(time.monotonic() - self.epoch_since, 3),
                "tunnel_errors": self.sync.errors, "last_tunnel_error": self.sync.last_error, "sas": sas,
                **({"datapath": underlay.statistics()} if underlay is not None else {})}

    def close(self) -> None:
        self.tunnel.close()


def open_node(cfg: DaemonConfig, listener: OnChange | None = None) -> FleetNode:
    """The FleetNode of a config whose fleet VPCs are resolved: claims the
    host index, builds the tunnel from the key file (created on the first
    start), serves the fleet VPCs of this host's interfaces. Blocking."""
    assert cfg.fleet is not None
    f = cfg.fleet
    public_key = load_public_key(f.key_file)
    ident = resolve_identity(cfg)
    try:
        tunnel = FleetTunnel.from_key_file(f.host, ident.index, f.key_file, f.underlay.packed, f.underlay_mtu,
                                           encrypt=f.encrypt, epoch=ident.epoch)
    except (keys.FleetKeyError, KeyMaterialError, ValueError, _datapath.DatapathError) as e:
        raise FleetStartupError(f"fleet tunnel: {e}") from None
    served = {v.id: i for i, v in enumerate(cfg.vpc) if v.vni is not None}
    agent = FleetAgent(endpoints=f.etcd, host=f.host, underlay=ipaddress.IPv4Address(f.underlay),
                       public_key=public_key, index=ident.index, epoch=ident.epoch,
                       interfaces=local_interfaces(cfg), lease_ttl=f.lease_ttl)
    log_event(log, logging.INFO, "fleet host", host=f.host, index=ident.index, epoch=ident.epoch,
              encrypt=f.encrypt, underlay_mtu=f.underlay_mtu, rekey_interval=f.rekey_interval)
    return FleetNode(agent, tunnel, TunnelSync(tunnel, served), cfg.state_dir / identity.STATE_FILE,
                     rekey_interval=f.rekey_interval, listener=listener)
