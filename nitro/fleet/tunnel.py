"""This host's tunnels to its peers: which SAs the C tunnel holds.

:class:`FleetTunnel` turns fleet facts (peers with their host index, public
key, underlay address and key epoch; the VNIs served here) into the C
tunnel's tables (nitro._datapath.Tunnel). The rekey rule (docs/fleet.md
"Key schedule"): every host has its own epoch, which only grows; it sends
under its current epoch E and publishes E. A receiver holds inbound SAs
for the sender's published E-1, E and E+1, so a sender that moved to E+1
before this host heard of it, or one still on E-1, loses nothing. Keys are
derived in C and each Secret is wiped as soon as its SA holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nitro import _datapath
from nitro.fleet import keys


@dataclass(frozen=True)
class Peer:
    """Another nitro host, as the fleet state describes it."""

    host: str
    index: int               # fleet-unique 1..2^24-1: the high bits of its SPIs
    public_key: bytes        # X25519, 32 bytes
    underlay: bytes          # IPv4, wire order
    epoch: int = 0           # the epoch it sends under, as it published it


@dataclass
class _PeerState:
    peer: Peer
    slot: int
    inbound: dict[int, int] = field(default_factory=dict)  # epoch -> SPI
    outbound_epoch: int | None = None


def accepted_epochs(epoch: int) -> list[int]:
    """The epochs of a sender whose inbound SAs a receiver keeps while the
    sender publishes epoch."""
    return [e for e in (epoch - 1, epoch, epoch + 1) if 0 <= e < 2**32]


def start_epoch(last_known: int | None, now: float) -> int:
    """The epoch to start sending under. A key and nonce must never be used
    twice, and a restarted sender counts its sequence numbers from 1 again,
    so it must never return to an epoch it sent under: one past the last it
    knows of (its state directory, its etcd record), and at least the Unix
    time, which also holds when both were lost (rekeys add one at a time,
    far slower than the clock)."""
    return max(int(now), last_known + 1 if last_known is not None else 0) % 2**32


class FleetTunnel:
    """This host's end. Not thread-safe: call from the control plane (one
    trio task); the datapath uses :attr:`tunnel` from any thread."""

    def __init__(self, host: str, index: int, private_key: _datapath.Secret, underlay: bytes,
                 mtu: int, *, encrypt: bool = True, epoch: int = 0) -> None:
        self.host = keys.check_host_id(host)
        keys.spi(index, 0)  # validates the index
        self.index = index
        self.encrypt = encrypt
        self.epoch = epoch
        self._key = private_key
        self.tunnel = _datapath.Tunnel(underlay, mtu, encrypt)
        self._peers: dict[str, _PeerState] = {}

    @classmethod
    def from_key_file(cls, host: str, index: int, key_file: Path, underlay: bytes, mtu: int,
                      **kw: Any) -> FleetTunnel:
        return cls(host, index, keys.load_private_key(key_file), underlay, mtu, **kw)

    @property
    def public_key(self) -> bytes:
        return keys.public_key(self._key)

    def serve_vni(self, vni: int, vpc: int) -> None:
        self.tunnel.add_vni(vni, vpc)

    def stop_serving(self, vni: int) -> None:
        self.tunnel.remove_vni(vni)

    def slot(self, host: str) -> int | None:
        state = self._peers.get(host)
        return state.slot if state is not None else None

    def peers(self) -> dict[str, tuple[Peer, int]]:
        """Every peer with its slot (a snapshot: safe from any thread)."""
        return {host: (s.peer, s.slot) for host, s in list(self._peers.items())}

    def set_peer(self, peer: Peer) -> int:
        """Add or update a peer; its slot. A new key or index re-derives its SAs."""
        if peer.host == self.host:
            raise keys.FleetKeyError(f"{peer.host} is this host")
        keys.spi(peer.index, 0)
        old = self._peers.get(peer.host)
        if old is None:
            used = {s.slot for s in self._peers.values()}
            free = next((s for s in range(_datapath.TUNNEL_MAX_PEERS) if s not in used), None)
            if free is None:
                raise keys.FleetKeyError(f"more than {_datapath.TUNNEL_MAX_PEERS} peers")
            old = _PeerState(peer, free)
        elif (old.peer.public_key, old.peer.index) != (peer.public_key, peer.index):
            self._drop_sas(old)
        self.tunnel.set_peer(old.slot, peer.underlay)
        old.peer = peer
        self._peers[peer.host] = old
        self._install(old)
        return old.slot

    def remove_peer(self, host: str) -> None:
        state = self._peers.pop(host, None)
        if state is not None:
            self.tunnel.remove_peer(state.slot)

    def set_epoch(self, epoch: int) -> None:
        """Send under a new epoch from now on (a rekey); publish it after.
        Epochs only grow: returning to one would reuse GCM nonces."""
        if epoch <= self.epoch:
            raise keys.FleetKeyError(f"epoch {epoch} is not past {self.epoch}: keys are never reused")
        self.epoch = epoch
        for state in self._peers.values():
            self._install(state)

    def rekey_wanted(self) -> bool:
        """True when an outbound SA is past NITRO_TUNNEL_SEQ_SOFT_LIMIT."""
        return any((self.tunnel.outbound_info(s.slot) or {}).get("rekey")
                   for s in self._peers.values())

    def sa_statistics(self) -> list[dict[str, Any]]:
        """Per peer (by host id): its slot, index and published epoch, the
        epochs of its inbound SAs, and the C tunnel's info (spi, epoch,
        seq, packets, age_ns) of the outbound SA (``out``) and of the
        inbound SA of its published epoch (``in``); None where there is
        none. Any thread: it reads copies of the tables (list() and dict()
        of them run under the GIL), the C tunnel locks its own."""
        out = []
        for state in list(self._peers.values()):
            p, inbound = state.peer, dict(state.inbound)
            spi_in = inbound.get(p.epoch)
            out.append({"peer": p.host, "slot": state.slot, "index": p.index, "peer_epoch": p.epoch,
                        "inbound_epochs": sorted(inbound),
                        "out": self.tunnel.outbound_info(state.slot) if self.encrypt else None,
                        "in": self.tunnel.inbound_info(spi_in) if spi_in is not None else None})
        return sorted(out, key=lambda e: e["peer"])

    def _drop_sas(self, state: _PeerState) -> None:
        for spi in state.inbound.values():
            self.tunnel.remove_inbound(spi)
        state.inbound.clear()
        self.tunnel.set_outbound(state.slot, None)
        state.outbound_epoch = None

    def _install(self, state: _PeerState) -> None:
        if not self.encrypt:
            return
        p = state.peer
        wanted = accepted_epochs(p.epoch)
        for epoch in wanted:
            if epoch not in state.inbound:
                with keys.derive(self._key, p.public_key, p.host, self.host, epoch) as km:
                    spi = keys.spi(p.index, epoch)
                    self.tunnel.add_inbound(state.slot, km, spi, epoch)
                state.inbound[epoch] = spi
        for epoch in [e for e in state.inbound if e not in wanted]:
            self.tunnel.remove_inbound(state.inbound.pop(epoch))
        if state.outbound_epoch != self.epoch:
            with keys.derive(self._key, p.public_key, self.host, p.host, self.epoch) as km:
                self.tunnel.set_outbound(state.slot, km, keys.spi(self.index, self.epoch),
                                         self.epoch)
            state.outbound_epoch = self.epoch

    def close(self) -> None:
        self.tunnel.close()
        self._key.close()
