"""The fleet state -> this host's tunnel (sans-IO: Changes in, FleetTunnel calls out).

:class:`TunnelSync` keeps a :class:`~nitro.fleet.tunnel.FleetTunnel` equal
to what the FleetState says, by difference (the agent hands it each load
or batch of watch events as ``Change`` lists):

- ``peers`` added or replaced -> ``set_peer`` (a new key or index
  re-derives the peer's SAs; a new epoch installs its E-1, E, E+1 inbound
  SAs and drops the older ones), removed -> ``remove_peer``;
- ``vpcs``: a VPC this host serves (one of its [[net]] entries is in it)
  -> ``serve_vni(vni, the switch's number of the VPC)``; removed or given
  another VNI -> ``stop_serving`` (a receiver drops the VNIs it does not
  serve: ``wrong_vni``).

A peer whose record cannot make an SA (a key X25519 refuses, an index
clash) is skipped and counted in ``errors``; one bad host record cannot
stop the others' tunnels.

:func:`rekey_reason` is the rekey schedule's rule, also sans-IO.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from nitro import _datapath
from nitro.fleet import keys
from nitro.fleet.schema import HostRecord, VpcRecord
from nitro.fleet.state import Change
from nitro.fleet.tunnel import FleetTunnel, Peer
from nitro.log import log_event

__all__ = ["TunnelSync", "peer_of", "rekey_reason"]

log = logging.getLogger("nitro.fleet")


def peer_of(record: HostRecord) -> Peer:
    return Peer(record.id, record.index, record.public_key, record.underlay.packed, record.epoch)


class TunnelSync:
    """Feeds one FleetTunnel. ``served`` maps the name of each fleet VPC
    this host serves to the switch's VPC number (its place in the config's
    VPC list)."""

    def __init__(self, tunnel: FleetTunnel, served: Mapping[str, int]) -> None:
        self.tunnel = tunnel
        self.served = dict(served)
        self.vnis: dict[str, int] = {}  # served VPC name -> the VNI the tunnel serves for it
        self.peer_epochs: dict[str, int] = {}  # peer -> the epoch it published, as installed
        self.errors = 0
        self.last_error = ""

    def apply(self, changes: Sequence[Change]) -> None:
        for c in changes:
            if c.view == "peers":
                self._peer(c.key, c.new)
            elif c.view == "vpcs":
                self._vpc(c.key, c.new)

    def _peer(self, host: str, record: HostRecord | None) -> None:
        if record is None:
            self.tunnel.remove_peer(host)
            self.peer_epochs.pop(host, None)
            return
        try:
            self.tunnel.set_peer(peer_of(record))
        except (keys.FleetKeyError, _datapath.DatapathError) as e:
            # Keep what it had, if anything: its old SAs stay valid.
            self._error(f"peer {host}: {e}")
            return
        self.peer_epochs[host] = record.epoch

    def _vpc(self, name: str, record: VpcRecord | None) -> None:
        number = self.served.get(name)
        if number is None:
            return  # no interface of this host is in it: its VNI is not ours to accept
        old = self.vnis.pop(name, None)
        if old is not None and (record is None or record.vni != old):
            self.tunnel.stop_serving(old)
        if record is not None and old != record.vni:
            try:
                self.tunnel.serve_vni(record.vni, number)
            except _datapath.DatapathError as e:
                self._error(f"vpc {name}: cannot serve VNI {record.vni}: {e}")
                return
        if record is not None:
            self.vnis[name] = record.vni

    def _error(self, what: str) -> None:
        self.errors += 1
        self.last_error = what
        log_event(log, logging.ERROR, "fleet tunnel update failed", error=what)


def rekey_reason(now: float, since: float, interval: float, seq_half_used: bool) -> str | None:
    """Why this host should move to its next epoch now, or None: its
    sequence space is half used on some SA ("sequence"), or ``interval``
    seconds passed since the last epoch began ("schedule")."""
    if seq_half_used:
        return "sequence"
    if now - since >= interval:
        return "schedule"
    return None
