"""The daemon's side of the fleet: what [fleet] turns into at start-up.

- :func:`resolve_vpcs`: the VPCs [[net]] entries name that the config does
  not define are read from etcd once, before the switch is built (their
  CIDR, gateway, MTU and DNS are what the switch and DHCP serve);
- :func:`make_agent`: the FleetAgent that registers this host and its
  interfaces in those VPCs and watches the fleet.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path

import trio

from nitro import config
from nitro.config import DaemonConfig, VpcConfig
from nitro.crypto.keys import KeyMaterialError
from nitro.fleet import keys, schema
from nitro.fleet.agent import FleetAgent, OnChange
from nitro.fleet.etcd import EtcdClient
from nitro.fleet.etcd_codec import EtcdError
from nitro.fleet.schema import InterfaceRecord, RecordError, VpcRecord
from nitro.log import log_event

__all__ = ["FleetStartupError", "load_public_key", "make_agent", "resolve_vpcs", "vpc_config"]

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT = 10.0  # seconds to read the VPCs at start-up before giving up


class FleetStartupError(Exception):
    """The fleet part of the config cannot be set up (etcd unreachable at
    start-up while a [[net]] needs a fleet VPC, a VPC missing, a key file
    unreadable). One line; the daemon exits before serving."""


def vpc_config(v: VpcRecord) -> VpcConfig:
    return VpcConfig(v.name, v.cidr, v.gateway, v.mtu, v.dns, vni=v.vni)


async def fetch_vpcs(endpoints: Sequence[str], names: Sequence[str], request_timeout: float) -> list[VpcConfig]:
    out = []
    async with EtcdClient(endpoints, timeout=request_timeout) as etcd:
        for name in names:
            kv = await etcd.get(f"{schema.VPCS}{name}".encode())
            if kv is None:
                continue  # with_fleet_vpcs names it
            try:
                out.append(vpc_config(VpcRecord.decode(name, kv.value)))
            except RecordError as e:
                raise FleetStartupError(f"fleet VPC {name} in etcd is unreadable: {e}") from None
    return out


def resolve_vpcs(cfg: DaemonConfig) -> DaemonConfig:
    """``cfg`` with the fleet VPCs its interfaces need (config.with_fleet_vpcs).
    Blocking: call it before the daemon's trio loop runs."""
    names = cfg.fleet_vpc_names()
    if not names:
        return cfg
    assert cfg.fleet is not None, "config.load accepts such [[net]] only with [fleet]"
    try:
        vpcs = trio.run(fetch_vpcs, cfg.fleet.etcd, names, RESOLVE_TIMEOUT / 2)
    except EtcdError as e:
        raise FleetStartupError(f"cannot read the fleet VPCs {', '.join(names)} from etcd: {e}") from None
    try:
        return config.with_fleet_vpcs(cfg, vpcs)
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


def make_agent(cfg: DaemonConfig, on_change: OnChange | None = None) -> FleetAgent:
    assert cfg.fleet is not None
    f = cfg.fleet
    return FleetAgent(endpoints=f.etcd, host=f.host, underlay=ipaddress.IPv4Address(f.underlay),
                      public_key=load_public_key(f.key_file), interfaces=local_interfaces(cfg),
                      lease_ttl=f.lease_ttl, on_change=on_change)
