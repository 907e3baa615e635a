"""NetDevice: one [[net]] interface as the vhost-user layer sees it.

Queue layout (virtio 1.2 5.1.2): receiveq1, transmitq1, ..., receiveqN,
transmitqN, controlq. TX rings are served by the C switch on an engine
worker; RX rings are filled by *other* threads (the workers serving peers'
TX rings, the uplink thread, injected control replies), so they are
attached to the switch before the engine takes them and detached, under
the RX slot lock, before it lets go (``on_vring_start`` / ``on_vring_stop``). The
control queue is normally kept by the frontend (QEMU and DPDK virtio-user
emulate it and send SET_VRING_ENABLE per pair); if a frontend passes it on,
C answers it.
"""

from __future__ import annotations

from nitro import _datapath
from nitro.config import NetConfig
from nitro.devices.base import VIRTIO_F_VERSION_1, VirtioDevice, read_config_window
from nitro.devices.net import config as netcfg
from nitro.vhost.protocol import ProtocolFeature
from nitro.vpc import VpcResponder
from nitro.vpc import packets as pk


class NetDevice(VirtioDevice):
    kind = "net"

    def __init__(self, cfg: NetConfig, switch: _datapath.Switch, port: int, mtu: int,
                 responder: VpcResponder | None = None) -> None:
        self.cfg = cfg
        self.switch = switch
        self.port = port
        self.responder = responder  # its VPC's control plane: the DHCP lease in statistics()
        self.pairs = cfg.queues
        self.num_queues = 2 * cfg.queues + 1
        self.max_queue_size = cfg.queue_size
        self.device_features = netcfg.device_features()
        self.protocol_features = int(
            ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
            | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.RESET_DEVICE)
        self.mac = pk.mac_bytes(cfg.mac)
        self.config_space = netcfg.config_space(self.mac, cfg.queues, mtu)
        self.acked_features = 0

    # -- backend contract ------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        return read_config_window(self.config_space, offset, size)

    def set_features(self, acked: int) -> None:
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 and acked:
            # Legacy headers are 10 bytes; the switch speaks virtio_net_hdr_v1.
            raise ValueError("virtio-net without VERSION_1 is not supported")
        bad = netcfg.missing_dependency(acked)
        if bad is not None:
            raise ValueError(f"feature bit {bad[0]} acked without bit {bad[1]} "
                             "(virtio 1.2 5.1.3.1)")
        self.acked_features = acked
        self.switch.set_port_features(self.port, acked)

    def _role(self, index: int) -> str:
        if index == 2 * self.pairs:
            return "ctrl"
        return "rx" if index % 2 == 0 else "tx"

    def make_ring(self, vring) -> _datapath.Ring:
        """The C ring an engine worker serves this queue through."""
        role = self._role(vring.index)
        if role == "tx":
            return _datapath.Ring.net_tx(self.switch, self.port, vring.vq)
        if role == "rx":
            return _datapath.Ring.net_rx(vring.vq)
        return _datapath.Ring.net_ctrl(vring.vq, self.pairs)

    def on_vring_start(self, vring) -> None:
        if self._role(vring.index) == "rx":
            self.switch.attach_rx(self.port, vring.index // 2, vring.vq)

    def on_vring_stop(self, vring) -> None:
        if self._role(vring.index) == "rx":
            self.switch.detach_rx(self.port, vring.index // 2)

    def _detach_all_rx(self) -> None:
        for pair in range(self.pairs):
            self.switch.detach_rx(self.port, pair)

    def reset(self) -> None:
        self._detach_all_rx()
        self.acked_features = 0
        self.switch.set_port_features(self.port, 0)

    def close(self) -> None:
        self._detach_all_rx()

    # -- observation -------------------------------------------------------
    def statistics(self) -> dict:
        """Called on the trio thread (status) and the metrics HTTP thread."""
        stats = {
            "kind": self.kind,
            "mac": self.cfg.mac,
            "ip": str(self.cfg.ip),
            "vpc": self.cfg.vpc,
            "queue_pairs": self.pairs,
            "net": self.switch.port_stats(self.port),
        }
        lease = self.responder.lease(self.port) if self.responder is not None else None
        if lease is not None:
            stats["lease"] = lease
        return stats
