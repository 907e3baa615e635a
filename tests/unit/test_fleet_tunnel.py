"""Geneve in ESP between hosts (cffi_build/nitro_tunnel.c, nitro/fleet/tunnel.py).

The outside peers are scapy (its SecurityAssociation with AES-GCM, its
Geneve layer from scapy.contrib.geneve) and Debian's tshark, both given
only what docs/fleet.md documents: the key schedule (written out again
here with `cryptography`, independently of nitro's C derivation), the SPI
rule and the wire format.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from nitro import _datapath as dp
from nitro.fleet import keys
from nitro.fleet.tunnel import FleetTunnel, Peer, start_epoch

NITRO_IP, OUTSIDE_IP = "10.99.0.1", "10.99.0.2"
NITRO_INDEX, OUTSIDE_INDEX = 0x1234, 0x77
VNI, VPC = 0x00ABCD, 3
MTU = 1500


def ip4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def documented_keymat(own: X25519PrivateKey, other_public: bytes, sender: str, receiver: str,
                      epoch: int) -> bytes:
    """docs/fleet.md "Key schedule", as an outside implementation reads it."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_public))
    info = f"nitro fleet esp aes-256-gcm v1 sender={sender} receiver={receiver} epoch={epoch}"
    return HKDF(SHA256(), 36, salt=b"nitro fleet esp v1", info=info.encode()).derive(shared)


def documented_spi(sender_index: int, epoch: int) -> int:
    return sender_index << 8 | epoch % 256


def inner_frame(payload: bytes = b"ping across hosts") -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IP(src="172.16.0.1", dst="172.16.0.2") / ICMP(id=7, seq=1) / payload)


class Outside:
    """A host that is not nitro: its own key pair; SAs as scapy objects."""

    def __init__(self, nitro_public: bytes, host: str = "outside") -> None:
        self.host = host
        self.key = X25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes_raw()
        self.nitro_public = nitro_public

    def sa(self, sender: str, receiver: str, epoch: int, spi: int,
           src: str, dst: str) -> SecurityAssociation:
        km = documented_keymat(self.key, self.nitro_public, sender, receiver, epoch)
        return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=km,
                                   auth_algo="NULL")

    def inbound(self, epoch: int = 0) -> SecurityAssociation:
        """Decrypts what nitro sends to this host."""
        return self.sa("nitro", self.host, epoch, documented_spi(NITRO_INDEX, epoch),
                       NITRO_IP, OUTSIDE_IP)

    def outbound(self, epoch: int = 0) -> SecurityAssociation:
        """Encrypts what this host sends to nitro."""
        return self.sa(self.host, "nitro", epoch, documented_spi(OUTSIDE_INDEX, epoch),
                       OUTSIDE_IP, NITRO_IP)

    def packet(self, frame: bytes, seq: int, vni: int = VNI, sa: SecurityAssociation | None = None,
               epoch: int = 0) -> bytes:
        """Built the way docs/fleet.md's wire format says, by scapy."""
        clear = (IP(src=OUTSIDE_IP, dst=NITRO_IP) / UDP(sport=50000, dport=6081)
                 / GENEVE(vni=vni, proto=0x6558) / Ether(frame))
        sa = sa or self.outbound(epoch)
        return bytes(sa.encrypt(clear, seq_num=seq))


@pytest.fixture
def nitro_key(tmp_path) -> Path:
    path = tmp_path / "nitro.key"
    keys.generate_private_key(path)
    return path


def make_nitro(key_file: Path, *, encrypt: bool = True, epoch: int = 0) -> FleetTunnel:
    t = FleetTunnel.from_key_file("nitro", NITRO_INDEX, key_file, ip4(NITRO_IP), MTU,
                                  encrypt=encrypt, epoch=epoch)
    t.serve_vni(VNI, VPC)
    return t


@pytest.fixture
def pair(nitro_key):
    """(nitro, outside, the outside's slot at nitro)."""
    nitro = make_nitro(nitro_key)
    outside = Outside(nitro.public_key)
    slot = nitro.set_peer(Peer(outside.host, OUTSIDE_INDEX, outside.public, ip4(OUTSIDE_IP)))
    yield nitro, outside, slot
    nitro.close()


def two_hosts(tmp_path: Path, a_epoch: int = 0) -> tuple[FleetTunnel, FleetTunnel, int, int]:
    """Nitro hosts a (index 1, 10.0.0.1) and b (index 2, 10.0.0.2), both
    serving VNI; (a, b, b's slot at a, a's slot at b)."""
    ka, kb = tmp_path / "a.key", tmp_path / "b.key"
    pub_a, pub_b = keys.generate_private_key(ka), keys.generate_private_key(kb)
    a = FleetTunnel.from_key_file("a", 1, ka, ip4("10.0.0.1"), MTU)
    b = FleetTunnel.from_key_file("b", 2, kb, ip4("10.0.0.2"), MTU)
    a.serve_vni(VNI, 9)
    b.serve_vni(VNI, VPC)
    b_at_a = a.set_peer(Peer("b", 2, pub_b, ip4("10.0.0.2")))
    a_at_b = b.set_peer(Peer("a", 1, pub_a, ip4("10.0.0.1"), epoch=a_epoch))
    return a, b, b_at_a, a_at_b


def drops(t: FleetTunnel) -> dict[str, int]:
    return {k: v for k, v in t.tunnel.stats()["drops"].items() if v}


# ---- nitro <-> nitro -------------------------------------------------------


def test_round_trip_between_two_nitro_hosts(tmp_path):
    a, b, b_at_a, a_at_b = two_hosts(tmp_path)
    frames = [inner_frame(os.urandom(n)) for n in (0, 1, 2, 3, 100, MTU - 87 - 28)]
    out = a.tunnel.encap(b_at_a, VNI, frames)
    assert all(isinstance(p, bytes) and len(p) <= MTU for p in out)
    got = b.tunnel.decap(out)
    assert [(g.frame, g.vni, g.vpc, g.peer) for g in got] == [(f, VNI, VPC, a_at_b) for f in frames]
    back = a.tunnel.decap(b.tunnel.encap(a_at_b, VNI, frames[:1]))
    assert back[0].frame == frames[0] and back[0].peer == b_at_a and back[0].vpc == 9
    st = b.tunnel.peer_stats(a_at_b)
    assert st["packets_in"] == len(frames)
    assert st["bytes_in"] == sum(map(len, frames))
    assert a.tunnel.outbound_info(b_at_a)["seq"] == len(frames)


def test_guest_mtu_is_underlay_minus_overhead(pair):
    nitro, _, slot = pair
    # The largest inner frame: 1500 - 73 bytes of worst-case overhead.
    fits = inner_frame(bytes(MTU - dp.TUNNEL_ESP_OVERHEAD - 14 - 28))
    assert len(fits) == MTU - dp.TUNNEL_ESP_OVERHEAD
    big = fits + bytes(4)
    out = nitro.tunnel.encap(slot, VNI, [fits, big])
    assert isinstance(out[0], bytes) and out[1] == "mtu"
    assert nitro.tunnel.peer_stats(slot)["drops"]["mtu"] == 1


# ---- scapy as the outside peer ---------------------------------------------


def test_scapy_decrypts_what_nitro_sends(pair):
    nitro, outside, slot = pair
    frames = [inner_frame(b"x" * n) for n in (0, 1, 2, 3, 500)]
    for seq, (frame, pkt) in enumerate(zip(frames, nitro.tunnel.encap(slot, VNI, frames)), 1):
        outer = IP(pkt)
        assert (outer.src, outer.dst, outer.proto, outer.flags) == (NITRO_IP, OUTSIDE_IP, 50, "DF")
        assert IP(bytes(outer)).chksum == outer.chksum  # a valid header checksum
        esp = outer[ESP]
        assert (esp.spi, esp.seq) == (documented_spi(NITRO_INDEX, 0), seq)
        assert esp.data[:8] == seq.to_bytes(8, "big")  # IV = the sequence number
        clear = outside.inbound().decrypt(outer)
        assert clear[UDP].dport == 6081 and 49152 <= clear[UDP].sport <= 65535
        g = clear[GENEVE]
        assert (g.version, g.optionlen, g.oam, g.critical, g.proto, g.vni) == (0, 0, 0, 0, 0x6558, VNI)
        assert bytes(g[Ether]) == frame
        assert g[ICMP].id == 7


def test_nitro_accepts_what_scapy_sends(pair):
    nitro, outside, slot = pair
    frame = inner_frame(b"from outside")
    got = nitro.tunnel.decap([outside.packet(frame, seq) for seq in (1, 2, 3)])
    assert [(g.frame, g.vni, g.vpc, g.peer) for g in got] == [(frame, VNI, VPC, slot)] * 3
    assert drops(nitro) == {}


def test_every_tampered_byte_is_dropped(pair):
    nitro, outside, _ = pair
    pkt = outside.packet(inner_frame(), seq=5)
    esp_start = 20
    reasons = []
    for i in range(esp_start, len(pkt)):
        bad = bytearray(pkt)
        bad[i] ^= 0x01
        (r,) = nitro.tunnel.decap([bytes(bad)])
        assert isinstance(r, str), f"byte {i} flipped and still accepted"
        reasons.append(r)
    # SPI bytes: no such SA, but the lowest bit of the last one is the
    # epoch's, which names the next epoch's SA (another key); everything
    # else fails the ICV (the sequence number is in the AAD).
    assert reasons[:4] == ["unknown_spi"] * 3 + ["auth"]
    assert set(reasons[4:]) == {"auth"}
    assert nitro.tunnel.stats()["drops"]["auth"] == len(pkt) - esp_start - 3
    # Nothing was counted as seen: the genuine packet still passes, once.
    assert isinstance(nitro.tunnel.decap([pkt])[0], dp.TunnelFrame)
    assert nitro.tunnel.decap([pkt]) == ["replay"]


def test_wrong_key_wrong_vni_unknown_spi(pair):
    nitro, outside, slot = pair
    frame = inner_frame()
    stranger = Outside(nitro.public_key, host="stranger")  # its own key pair, outside's SPI
    wrong_key = outside.packet(frame, 1, sa=stranger.sa("outside", "nitro", 0,
                                                       documented_spi(OUTSIDE_INDEX, 0),
                                                       OUTSIDE_IP, NITRO_IP))
    wrong_vni = outside.packet(frame, 2, vni=VNI + 1)
    unknown = outside.packet(frame, 3, sa=outside.sa("outside", "nitro", 0, 0x99900,
                                                     OUTSIDE_IP, NITRO_IP))
    assert nitro.tunnel.decap([wrong_key, wrong_vni, unknown]) == ["auth", "wrong_vni", "unknown_spi"]
    assert drops(nitro) == {"auth": 1, "wrong_vni": 1, "unknown_spi": 1}
    # Drops traced to an SA count against that peer; an unknown SPI cannot.
    assert {k: v for k, v in nitro.tunnel.peer_stats(slot)["drops"].items() if v} == {
        "auth": 1, "wrong_vni": 1}


def test_replay_window_slides(pair, tmp_path):
    nitro, outside, _ = pair
    # scapy's packets are accepted once, then are replays.
    first = outside.packet(inner_frame(), 1)
    assert [isinstance(r, dp.TunnelFrame) for r in nitro.tunnel.decap([first, first])] == [True, False]
    # The window itself, with a nitro sender choosing its sequence numbers.
    a, b, b_at_a, _ = two_hosts(tmp_path)
    frame = inner_frame()

    def deliver(*seqs: int) -> list[bool]:
        pkts = []
        for s in seqs:
            a.tunnel.test_set_seq(b_at_a, s - 1)
            pkts += a.tunnel.encap(b_at_a, VNI, [frame])
        return [isinstance(r, dp.TunnelFrame) for r in b.tunnel.decap(pkts)]

    window = dp.TUNNEL_REPLAY_WINDOW
    assert window >= 64
    assert deliver(1500) == [True]
    # Old but inside the window: accepted once.
    assert deliver(600, 600) == [True, False]
    assert deliver(1500 - window + 1, 1500 - window) == [True, False]
    # A jump further than the whole bitmap, then the new window's edge.
    assert deliver(6000, 6000 - window + 1, 6000 - window, 1500) == [True, True, False, False]
    # In order through several turns of the bitmap ring, then replays of all of it.
    assert all(deliver(*range(6001, 6001 + 3000)))
    assert not any(deliver(*range(6001 + 3000 - window, 6001 + 3000)))
    st = b.tunnel.stats()
    assert st["drops"]["replay"] == 1 + 1 + 2 + window
    assert st["drops"]["auth"] == 0
    # Sequence number 0 is never sent (the first is 1): scapy makes one.
    zero = outside.packet(inner_frame(), 0)
    assert nitro.tunnel.decap([zero]) == ["replay"]


def test_rekey_overlap_loses_nothing(tmp_path):
    a, b, peer_b, _ = two_hosts(tmp_path)
    pub_a = a.public_key
    f = inner_frame()
    old = a.tunnel.encap(peer_b, VNI, [f])[0]
    a.set_epoch(1)  # a moves before b hears of it: b already holds a's epoch 1
    new = a.tunnel.encap(peer_b, VNI, [f])[0]
    assert IP(new)[ESP].spi == documented_spi(1, 1)
    assert a.tunnel.outbound_info(peer_b)["seq"] == 1  # a new SA starts at 1
    b.set_peer(Peer("a", 1, pub_a, ip4("10.0.0.1"), epoch=1))  # a's epoch 0 still accepted
    assert all(isinstance(r, dp.TunnelFrame) for r in b.tunnel.decap([new, old]))
    a.set_epoch(2)
    b.set_peer(Peer("a", 1, pub_a, ip4("10.0.0.1"), epoch=2))  # now epoch 0's SA is gone
    got = b.tunnel.decap([a.tunnel.encap(peer_b, VNI, [f])[0], old])
    assert isinstance(got[0], dp.TunnelFrame) and got[1] == "unknown_spi"
    # Going back would send under a key with sequence numbers already used.
    for epoch in (2, 1):
        with pytest.raises(keys.FleetKeyError, match="never reused"):
            a.set_epoch(epoch)


def test_start_epoch_never_returns_to_a_used_one():
    assert start_epoch(None, 1_800_000_000.7) == 1_800_000_000
    assert start_epoch(1_800_000_500, 1_800_000_000) == 1_800_000_501
    assert start_epoch(5, 1_800_000_000) == 1_800_000_000


def test_concurrent_senders_and_rekeys_never_share_a_nonce(pair):
    nitro, _, slot = pair
    frame = inner_frame()
    seen: list[tuple[int, int]] = []
    sent = [0, 0, 0]
    stop = threading.Event()

    def sender(n: int) -> None:
        batch = dp.TunnelBatch(16, MTU)
        batch.set_frames([frame] * 16)
        # Senders run until the rekeys are over, so every rekey lands while
        # they send however fast this machine is (a fixed count could end
        # before the second epoch).
        while not stop.is_set():
            nitro.tunnel.encap_batch(slot, VNI, batch, 16)
            sent[n] += 1
            for i in range(16):
                if batch.pkts[i].drop < 0:
                    esp = batch.slot(i, 20, 8)
                    seen.append((int.from_bytes(esp[:4], "big"), int.from_bytes(esp[4:], "big")))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    # Fewer than 256 epochs: the SPI's epoch byte must not wrap within the test.
    for epoch in range(1, 41):
        nitro.set_epoch(epoch)  # frees the SA the senders were using
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert min(sent) > 0
    assert len(seen) == sum(sent) * 16
    assert len(set(seen)) == len(seen)
    # The frames went out under several epochs' SAs: the rekeys happened
    # while the senders were sending.
    assert len({spi for spi, _ in seen}) > 1


def test_sequence_numbers_never_cycle(pair):
    nitro, outside, slot = pair
    frame = inner_frame()
    nitro.tunnel.test_set_seq(slot, 2**31 - 2)
    nitro.tunnel.encap(slot, VNI, [frame])
    assert not nitro.rekey_wanted()
    nitro.tunnel.encap(slot, VNI, [frame])
    assert nitro.rekey_wanted()  # past 2^31: time for the next epoch
    # Without extended sequence numbers 2^32 - 1 is the last (RFC 4303 3.3.3).
    nitro.tunnel.test_set_seq(slot, 2**32 - 2)
    last, after = nitro.tunnel.encap(slot, VNI, [frame, frame])
    assert IP(last)[ESP].seq == 2**32 - 1 and after == "no_sa"
    assert outside.inbound().decrypt(IP(last))[GENEVE].vni == VNI
    nitro.set_epoch(1)
    (fresh,) = nitro.tunnel.encap(slot, VNI, [frame])
    assert IP(fresh)[ESP].seq == 1 and not nitro.rekey_wanted()


# ---- the plain mode and the policy between modes ---------------------------


def test_plain_mode_round_trip_and_policy(nitro_key):
    plain = make_nitro(nitro_key, encrypt=False)
    outside = Outside(plain.public_key)
    slot = plain.set_peer(Peer(outside.host, OUTSIDE_INDEX, outside.public, ip4(OUTSIDE_IP)))
    frame = inner_frame()
    (pkt,) = plain.tunnel.encap(slot, VNI, [frame])
    assert len(pkt) == len(frame) + dp.TUNNEL_PLAIN_OVERHEAD
    p = IP(pkt)
    assert (p.proto, p[UDP].dport, p[GENEVE].vni, bytes(p[GENEVE][Ether])) == (17, 6081, VNI, frame)
    clear = bytes(IP(src=OUTSIDE_IP, dst=NITRO_IP) / UDP(sport=50001, dport=6081)
                  / GENEVE(vni=VNI, proto=0x6558) / Ether(frame))
    stranger = bytes(IP(src="10.99.0.77", dst=NITRO_IP) / UDP(dport=6081)
                     / GENEVE(vni=VNI, proto=0x6558) / Ether(frame))
    esp = outside.packet(frame, 1)
    got = plain.tunnel.decap([clear, stranger, esp])
    assert got[0] == dp.TunnelFrame(frame, VNI, VPC, slot)
    assert got[1:] == ["unknown_peer", "policy"]
    plain.close()


def test_encrypting_tunnel_refuses_clear_geneve(pair):
    nitro, _, _ = pair
    clear = bytes(IP(src=OUTSIDE_IP, dst=NITRO_IP) / UDP(dport=6081)
                  / GENEVE(vni=VNI, proto=0x6558) / Ether(inner_frame()))
    assert nitro.tunnel.decap([clear]) == ["policy"]


@pytest.mark.parametrize("geneve", [
    GENEVE(vni=VNI, proto=0x0800),                 # not Ethernet
    GENEVE(vni=VNI, proto=0x6558, version=1),
    GENEVE(vni=VNI, proto=0x6558, oam=1),          # a control message
    GENEVE(vni=VNI, proto=0x6558, critical=1),     # options we cannot understand
], ids=["proto", "version", "oam", "critical"])
def test_geneve_we_must_not_forward_is_malformed(pair, geneve):
    nitro, outside, _ = pair
    clear = IP(src=OUTSIDE_IP, dst=NITRO_IP) / UDP(dport=6081) / geneve / Ether(inner_frame())
    pkt = bytes(outside.outbound().encrypt(clear, seq_num=1))
    assert nitro.tunnel.decap([pkt]) == ["malformed"]


# ---- tshark ----------------------------------------------------------------


def test_tshark_decodes_down_to_the_inner_icmp(pair, tmp_path):
    nitro, outside, slot = pair
    frames = [inner_frame(b"tshark %d" % i) for i in range(3)]
    pcap = tmp_path / "underlay.pcap"
    wrpcap(str(pcap), [Ether() / IP(p) for p in nitro.tunnel.encap(slot, VNI, frames)])
    km = documented_keymat(outside.key, nitro.public_key, "nitro", outside.host, 0)
    sa = (f'"IPv4","{NITRO_IP}","{OUTSIDE_IP}","0x{documented_spi(NITRO_INDEX, 0):08x}",'
          f'"AES-GCM with 16 octet ICV [RFC4106]","0x{km.hex()}","NULL",""')
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path), HOME=str(tmp_path))
    fields = ["esp.spi", "esp.sequence", "esp.icv_good", "udp.dstport", "geneve.vni",
              "eth.type", "ip.src", "icmp.type", "data.data"]
    r = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
         "-o", "esp.enable_authentication_check:TRUE", "-o", f"uat:esp_sa:{sa}",
         "-T", "fields", "-E", "separator=|", *sum((["-e", f] for f in fields), [])],
        capture_output=True, text=True, env=env, timeout=60, check=True)
    rows = [line.split("|") for line in r.stdout.splitlines()]
    assert len(rows) == 3
    for i, row in enumerate(rows):
        spi, seq, good, dport, vni, eth_types, ip_src, icmp, data = row
        assert int(spi, 0) == documented_spi(NITRO_INDEX, 0) and int(seq) == i + 1
        assert good.lower() in ("1", "true")
        assert dport == "6081" and int(vni, 0) == VNI
        assert ip_src.split(",")[-1] == "172.16.0.2" or "172.16.0.1" in ip_src
        assert icmp == "8"
        assert bytes.fromhex(data.replace(":", "")) == b"tshark %d" % i
