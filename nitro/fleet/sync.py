"""The fleet state -> this host's datapath (sans-IO: Changes in, tunnel and switch calls out).

:class:`TunnelSync` is the one path from the FleetState to the datapath.
It keeps a :class:`~nitro.fleet.tunnel.FleetTunnel` (peers, SAs, the VNIs
accepted) and, once one is attached, the
:class:`~nitro.devices.net.underlay.Underlay` (the switch's VNIs, remote
table and ARP answers) equal to what the state says, by difference: the
agent hands it each load or batch of watch events as a ``Change`` list,
which it applies in the list's order (remotes withdrawn, then peers and
VPCs, then remotes added: nitro/fleet/state.py), each change to the
tunnel and the switch together:

- ``peers`` added or replaced -> ``set_peer`` (a new key or index
  re-derives the peer's SAs; a new epoch installs its E-1, E, E+1 inbound
  SAs and drops the older ones), removed -> the switch forgets the
  host's interfaces, then ``remove_peer`` frees its slot;
- ``vpcs``: a VPC this host serves (one of its [[net]] entries is in it)
  -> ``serve_vni(vni, the switch's number of the VPC)`` and the switch
  sends its frames with that VNI; removed or given another VNI ->
  ``stop_serving`` (a receiver drops the VNIs it does not serve:
  ``wrong_vni``);
- ``remotes`` in a VPC this host serves -> ``set_remote`` /
  ``remove_remote`` (the switch's remote table, the responder's ARP).

A peer whose record cannot make an SA (a key X25519 refuses, an index
clash), or a remote the switch refuses (it claims a local interface's
address), is skipped and counted in ``errors``; one bad record cannot stop
the others.

:func:`rekey_reason` is the rekey schedule's rule, also sans-IO.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from nitro import _datapath
from nitro.devices.net.underlay import Underlay, UnderlayError
from nitro.fleet import keys
from nitro.fleet.schema import HostRecord, VpcRecord
from nitro.fleet.state import Change, FleetState, Remote
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
        self.underlay: Underlay | None = None

    def attach(self, underlay: Underlay, state: FleetState) -> None:
        """The switch follows from now on, starting with what ``state``
        and the tunnel hold already (served VNIs, remote interfaces)."""
        self.underlay = underlay
        for name, vni in self.vnis.items():
            underlay.serve_vpc(name, vni)
        for key, remote in state.remotes.items():
            self._remote(key, remote)

    def detach(self) -> Underlay | None:
        """Stop feeding the switch (before the Underlay closes)."""
        underlay, self.underlay = self.underlay, None
        return underlay

    def apply(self, changes: Sequence[Change]) -> None:
        for c in changes:
            if c.view == "peers":
                self._peer(c.key, c.new)
            elif c.view == "vpcs":
                self._vpc(c.key, c.new)
            elif c.view == "remotes":
                self._remote(c.key, c.new)

    def _peer(self, host: str, record: HostRecord | None) -> None:
        if record is None:
            if self.underlay is not None:
                self.underlay.forget_host(host)  # nothing may point at its slot once freed
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
            if self.underlay is not None:
                self.underlay.stop_serving_vpc(name)
        if record is not None and old != record.vni:
            try:
                self.tunnel.serve_vni(record.vni, number)
            except _datapath.DatapathError as e:
                self._error(f"vpc {name}: cannot serve VNI {record.vni}: {e}")
                return
        if record is not None:
            self.vnis[name] = record.vni
            if self.underlay is not None:
                self.underlay.serve_vpc(name, record.vni)

    def _remote(self, key: tuple, remote: Remote | None) -> None:
        vpc, ip = key
        if self.underlay is None or vpc not in self.served:
            return  # no switch yet (attach catches up), or no interface of ours in that VPC
        if remote is None:
            self.underlay.remove_remote(vpc, ip)
            return
        try:
            self.underlay.set_remote(vpc, ip, remote.mac, remote.host)
        except UnderlayError as e:
            self.underlay.remove_remote(vpc, ip)  # no stale mapping to where it was
            self._error(f"remote {vpc}/{ip} on {remote.host}: {e}")

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
