"""Guest memory that vanishes under the datapath (nitro_guard.h): a frontend
truncates the memfd behind its guest's RAM while C serves it.

The touch that follows raises SIGBUS. It must break that guest's ring
(fault "memory") and nothing else: the process lives, other rings on the
same worker keep serving, and a lock held at the time is released. Each
scenario runs in a child interpreter, so that a SIGBUS that is not
recovered kills the child (the test then fails with the signal), not the
test run. Scenarios must not touch a truncated guest from Python either:
the test's own mapping of it would fault.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, GuestFault, Ring
from nitro.vpc import gateway_mac
from nitro.vpc import packets as pk
from tests.ringlayout import BLK_HEADER, NET_HDR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, blk_header
from tests.unit.test_engine import wait_used
from tests.unit.virtq import GUARD, Buf, FakeGuest, MiB, SplitRing, blk_req, disk_file, status_of

ROOT = Path(__file__).resolve().parents[2]
GPA = 0x1000_0000
FAR_GPA = 0x2000_0000
CAPACITY = 4096
PAGE = os.sysconf("SC_PAGE_SIZE")


def run_isolated(scenario: str) -> str:
    """Run this module's function `scenario` in a child interpreter; its stdout."""
    code = f"from tests.unit.test_guest_memory import {scenario}; {scenario}()"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, (f"{scenario} died with {p.returncode} "
                               f"(-7 is SIGBUS)\n{p.stdout}\n{p.stderr}")
    return p.stdout


def wait_event(engine: _datapath.Engine, timeout: float = 10.0) -> None:
    r, _, _ = select.select([engine.event_fd], [], [], timeout)
    assert r, "no ring reported an error"
    os.read(engine.event_fd, 8)


def fault_of(ring: Ring) -> str | None:
    try:
        ring.check()
    except GuestFault as e:
        return e.kind
    return None


def exit_now() -> None:
    """Report success and leave without finalizers: the scenario's engine
    still serves rings on memory the garbage collector would free."""
    print("survived", flush=True)
    os._exit(0)


def forget(guest: FakeGuest) -> None:
    """Close a truncated guest without reading it (close() only unmaps)."""
    guest.close()


# -- blk: the worker's poll ------------------------------------------------------

def serve_reads(guest: FakeGuest, ring: SplitRing, n: int) -> None:
    reqs = [blk_req(guest, VIRTIO_BLK_T_IN, sector=8 * k, in_len=4096) for k in range(n)]
    for q in reqs:
        ring.add_chain(q.bufs)
    ring.kick()
    wait_used(ring, n)
    assert all(status_of(guest, q) == VIRTIO_BLK_S_OK for q in reqs)


def blk_truncated_while_served() -> None:
    engine = _datapath.Engine(1)
    with disk_file(CAPACITY * 512) as fd:
        params = BlkParams(fd, CAPACITY)
        stats = BlkStats(), BlkStats()
        victim, other = FakeGuest([(GPA, 8 * MiB)]), FakeGuest([(GPA, 8 * MiB)])
        vring, oring = SplitRing(victim, num=64), SplitRing(other, num=64)
        rings = Ring.blk(vring.vq, params, stats[0]), Ring.blk(oring.vq, params, stats[1])
        for r in rings:
            engine.attach(r, 0)  # one worker serves both
        serve_reads(victim, vring, 2)
        serve_reads(other, oring, 2)
        os.ftruncate(victim.fd, 0)  # the frontend takes the guest's RAM away
        vring.kick()
        wait_event(engine)
        assert fault_of(rings[0]) == "memory"
        assert vring.vq.stats()["faults"]["memory"] == 1
        serve_reads(other, oring, 8)  # the same worker goes on
        assert fault_of(rings[1]) is None
        for r in rings:
            engine.detach(r)
            r.close()
        vring.close()
        oring.close()
        forget(victim)
        other.close()
        params.close()
    engine.close()
    print("survived")


def test_a_truncated_guest_breaks_its_blk_ring_and_the_worker_serves_on() -> None:
    assert "survived" in run_isolated("blk_truncated_while_served")


def blk_requests_cut_short_leave_nothing_in_flight() -> None:
    """A read and a GET_ID whose headers stay but whose buffers and status
    bytes lie in memory the frontend takes away: the GET_ID's answer faults
    in the poll, the read's status store on its io_uring completion. The
    ring breaks and neither is ever answered; once the ring is freed the
    device counts neither in flight (its gauge, and the stuck-I/O alert on
    it, would otherwise stay up for good)."""
    engine = _datapath.Engine(1)
    with disk_file(CAPACITY * 512) as fd:
        params, stats = BlkParams(fd, CAPACITY), BlkStats()
        guest = FakeGuest([(GPA, 4 * MiB), (FAR_GPA, 4 * MiB)])
        ring = SplitRing(guest, num=16)
        r = Ring.blk(ring.vq, params, stats)
        engine.attach(r, 0)
        serve_reads(guest, ring, 2)
        for type_, in_len in ((VIRTIO_BLK_T_IN, 4096), (VIRTIO_BLK_T_GET_ID, 20)):
            hdr = guest.alloc(BLK_HEADER.size)
            guest.write(hdr, blk_header(type_))
            ring.add_chain([Buf(hdr, BLK_HEADER.size),
                            Buf(guest.alloc(in_len, region=1), in_len, writable=True),
                            Buf(guest.alloc(1, align=1, region=1), 1, writable=True)])
        os.ftruncate(guest.fd, guest.regions[1].file_off)  # the far region goes
        ring.kick()
        wait_event(engine)
        assert fault_of(r) == "memory"
        engine.detach(r)  # waits for the read's completion: both cut short
        assert stats.snapshot()["inflight"] == 2
        r.close()
        assert stats.snapshot()["inflight"] == 0
        ring.close()
        forget(guest)
        params.close()
    engine.close()
    print("survived")


def test_blk_requests_a_fault_cut_short_are_not_left_in_flight() -> None:
    assert "survived" in run_isolated("blk_requests_cut_short_leave_nothing_in_flight")


# -- net: deliveries into a truncated receiver, reads from a truncated sender ------

SENDER, VICTIM, PEER = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0d"
SENDER_IP, VICTIM_IP, PEER_IP = "10.0.0.10", "10.0.0.11", "10.0.0.13"
HDR = NET_HDR.size


def ip4(s: str) -> bytes:
    return bytes(int(x) for x in s.split("."))


def udp(dst_mac: str, dst_ip: str, size: int = 1000) -> bytes:
    return bytes(Ether(src=SENDER, dst=dst_mac) / IP(src=SENDER_IP, dst=dst_ip)
                 / UDP(sport=5000, dport=6000) / bytes(size))


class TwoGuests:
    """The sender's TX ring on one guest; the victim's and the peer's RX
    rings on another (their own memfd), all served by one engine worker."""

    def __init__(self, seccomp: bool = False) -> None:
        self.sw = _datapath.Switch()
        self.sw.add_vpc(0, gateway_mac("blue"), ip4("10.0.0.1"), 1500)
        for port, (mac, ip) in enumerate([(SENDER, SENDER_IP), (VICTIM, VICTIM_IP),
                                          (PEER, PEER_IP)]):
            self.sw.add_port(port, 0, pk.mac_bytes(mac), ip4(ip))
            self.sw.set_port_features(port, 1 << 32)
        self.engine = _datapath.Engine(1, seccomp=seccomp)
        self.tx_guest = FakeGuest([(GPA, 8 * MiB)])
        self.tx = SplitRing(self.tx_guest, num=64)
        self.tx_ring = Ring.net_tx(self.sw, 0, self.tx.vq)
        self.rx_guests = {1: FakeGuest([(GPA, 4 * MiB)]), 2: FakeGuest([(GPA, 4 * MiB)])}
        self.rx: dict[int, SplitRing] = {}
        self.rx_rings: dict[int, Ring] = {}
        for port, g in self.rx_guests.items():
            ring = SplitRing(g, num=64)
            ring.bufs = [g.alloc(2048) for _ in range(32)]
            for gpa in ring.bufs:
                ring.add_chain([Buf(gpa, 2048, writable=True)])
            self.sw.attach_rx(port, 0, ring.vq)
            self.rx[port] = ring
            self.rx_rings[port] = Ring.net_rx(ring.vq)
            self.engine.attach(self.rx_rings[port], 0)
        self.engine.attach(self.tx_ring, 0)

    def send(self, frames: list[bytes], far: int = 0, kick: bool = True) -> None:
        """TX chains: header and frame head in one buffer, the rest in
        another; every rest lies `far` bytes beyond every head."""
        datas = [bytes(HDR) + f for f in frames]
        heads = [self.tx_guest.alloc(256) for _ in datas]
        self.tx_guest.alloc(far or 1)
        for head, data in zip(heads, datas):
            cut = min(256, len(data) - 1)
            self.tx_guest.write(head, data[:cut])
            rest = self.tx_guest.alloc(len(data) - cut)
            self.tx_guest.write(rest, data[cut:])
            self.tx.add_chain([Buf(head, cut), Buf(rest, len(data) - cut)])
        if kick:
            self.tx.kick()

    def received(self, port: int, n: int) -> list[bytes]:
        ring = self.rx[port]
        return [self.rx_guests[port].read(ring.bufs[h], length)[HDR:]
                for h, length in wait_used(ring, n)]


def receiver_truncated_mid_delivery() -> None:
    """The victim's RX memory goes while the sender's worker copies into it
    under the victim's RX slot lock: the victim's ring breaks, the lock is
    released (detach_rx takes it), the sender and the peer go on."""
    n = TwoGuests()
    n.send([udp(PEER, PEER_IP)])
    assert n.received(2, 1) == [udp(PEER, PEER_IP)]
    os.ftruncate(n.rx_guests[1].fd, 0)
    n.send([udp(VICTIM, VICTIM_IP)] * 3 + [udp(PEER, PEER_IP, 500)])
    wait_event(n.engine)
    assert fault_of(n.rx_rings[1]) == "memory"
    assert n.received(2, 1) == [udp(PEER, PEER_IP, 500)]
    assert fault_of(n.tx_ring) is None
    n.sw.detach_rx(1, 0)  # would hang forever on a slot lock left held
    n.send([udp(PEER, PEER_IP, 200)])
    assert n.received(2, 1) == [udp(PEER, PEER_IP, 200)]
    exit_now()


def sender_truncated_mid_copy() -> None:
    """The sender's payload goes while its frames are copied straight into
    the peer's RX buffers (the fast path, under the peer's slot lock): the
    sender's ring breaks, the peer's ring gets back the buffers that copy
    took and keeps working, and its lock is released."""
    n = TwoGuests()
    n.send([udp(PEER, PEER_IP)])
    assert n.received(2, 1) == [udp(PEER, PEER_IP)]
    # Heads (checked from a copy) stay; payloads lie past the cut.
    far = 2 * MiB
    cut_gpa = n.tx_guest._next[GPA] + far // 2
    n.send([udp(PEER, PEER_IP)] * 2, far=far, kick=False)
    os.ftruncate(n.tx_guest.fd, GUARD + (cut_gpa - GPA) // PAGE * PAGE)
    n.tx.kick()
    wait_event(n.engine)
    assert fault_of(n.tx_ring) == "memory"
    assert fault_of(n.rx_rings[2]) is None
    assert n.rx[2].take_used() == []  # nothing half copied was published
    n.engine.detach(n.tx_ring)
    n.sw.detach_rx(2, 0)  # the lock is free
    n.sw.attach_rx(2, 0, n.rx[2].vq)
    assert n.sw.inject(2, udp(PEER, PEER_IP, 300))
    # The buffer the cut-short copy took was given back: it is used next.
    [(head, length)] = wait_used(n.rx[2], 1)
    assert head == 1
    assert n.rx_guests[2].read(n.rx[2].bufs[head], length)[HDR:] == udp(PEER, PEER_IP, 300)
    exit_now()


@pytest.mark.parametrize("scenario", ["receiver_truncated_mid_delivery",
                                      "sender_truncated_mid_copy"])
def test_a_truncated_net_guest_breaks_only_its_own_ring(scenario: str) -> None:
    assert "survived" in run_isolated(scenario)


# -- the control plane's thread --------------------------------------------------

def ring_address_in_truncated_memory() -> None:
    g = FakeGuest([(GPA, 4 * MiB)])
    ring = SplitRing(g, num=16)
    os.ftruncate(g.fd, 0)
    with pytest.raises(GuestFault) as e:  # SET_VRING_ADDR reads used->idx
        ring.vq.set_addr(g.mem, g.uaddr(ring.desc), g.uaddr(ring.avail), g.uaddr(ring.used))
    assert e.value.kind == "memory"
    ring.close()
    forget(g)
    print("survived")


def test_set_vring_addr_on_truncated_memory_is_a_guest_fault() -> None:
    assert "survived" in run_isolated("ring_address_in_truncated_memory")


def test_a_sigbus_outside_guest_memory_still_kills() -> None:
    """The handler recovers guest memory only: a SIGBUS in nitro's own
    mapping of a truncated file is the crash it always was."""
    code = ("import mmap, os; from nitro import _datapath; e = _datapath.Engine(1);"
            "fd = os.memfd_create('x'); os.ftruncate(fd, 4096); m = mmap.mmap(fd, 4096);"
            "os.ftruncate(fd, 0); m[0]")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert p.returncode == -7


# -- the cap ---------------------------------------------------------------------------

def test_mapped_guest_memory_is_counted_and_capped() -> None:
    base = _datapath.guest_memory_mapped()
    with FakeGuest([(GPA, 4 * MiB)]) as g:
        assert _datapath.guest_memory_mapped() - base == 4 * MiB
        _datapath.set_guest_memory_limit(base + 4 * MiB + 2 * MiB)
        try:
            extra = _datapath.GuestMemory()
            with pytest.raises(_datapath.LimitError):
                extra.add_region(g.fd, 0x9000_0000, 4 * MiB, 0x1000, GUARD)
            extra.add_region(g.fd, 0x9000_0000, 2 * MiB, 0x1000, GUARD)
            assert _datapath.guest_memory_mapped() - base == 6 * MiB
            extra.close()
        finally:
            _datapath.set_guest_memory_limit(None)
        assert g.mem.sealed == 0  # FakeGuest's memfd has no seals
    assert _datapath.guest_memory_mapped() == base
