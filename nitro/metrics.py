"""Every Prometheus metric nitro exports, in one place.

The counters live in C (per virtqueue, per device) and are read at scrape
time: :class:`NitroCollector` calls ``statistics()`` on each device (and
``get_vpcs()`` for the VPC control plane and uplinks) when Prometheus
scrapes, in prometheus-client's HTTP thread, and turns the dicts into metric
families. Nothing is incremented from Python on the data path (the VPC
responders' counters are plain ints bumped on the trio thread, per control
frame).

Names are ``nitro_<subsystem>_<noun>_<unit>``; label values that have a fixed
vocabulary (``op``, ``error``) are all emitted, at 0 if need be, so that
``rate()`` and alerts see a series from the first scrape. docs/metrics.md
describes each metric with example PromQL.

A device (or VPC) whose statistics raise (or are a malformed dict) is left
out of that scrape and logged; the scrape itself still succeeds, and
``nitro_metrics_collect_errors_total`` counts such failures.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from ._datapath import FAULT_NAMES, OP_NAMES

__all__ = [
    "BLK_OPS",
    "GUEST_ERRORS",
    "NitroCollector",
    "make_registry",
    "parse_listen",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

#: ``op`` label values of the nitro_blk_* metrics (keys of statistics()["ops"]).
BLK_OPS = OP_NAMES

#: ``error`` label values of nitro_guest_errors_total (keys of a queue's "faults").
GUEST_ERRORS = tuple(FAULT_NAMES.values())

#: The per-interface allowances (``<name>_allowance_exceeded`` in statistics()["net"]).
NET_ALLOWANCES = {
    "bw_in": "Frames towards the guest dropped because the interface's inbound bandwidth allowance was exceeded.",
    "bw_out": "Frames from the guest dropped because the interface's outbound bandwidth allowance was exceeded.",
    "pps": "Frames (either direction) dropped because the interface's packets-per-second allowance was exceeded.",
    "linklocal": "Frames to nitro's own services (ARP, DHCP, ICMP to the gateway) dropped because the "
                 "interface's link-local packets-per-second allowance was exceeded.",
}

GetDevices = Callable[[], Iterable[Any]]
#: Returns ``{vpc_id: NetFabric.statistics()[vpc_id]}`` (``{}`` without VPCs).
GetVpcs = Callable[[], dict]
#: Returns ``Engine.statistics()`` (nitro/engine.py), or None before it starts.
GetEngine = Callable[[], dict | None]
#: Returns ``FleetNode.statistics()`` (nitro/fleet/node.py), or None without [fleet].
GetFleet = Callable[[], dict | None]
GetWaiting = Callable[[], list[dict]]

#: Fleet gauges: statistics key -> (metric name, help).
FLEET_GAUGES = {
    "watch_lag_seconds": ("nitro_fleet_watch_lag_seconds",
                          "How far behind etcd the fleet state may be: 0 while the watch is open, else "
                          "the time since it was lost."),
    "revision": ("nitro_fleet_revision", "The etcd revision the fleet state is at."),
    "peers": ("nitro_fleet_peers", "Other hosts registered in etcd (leases alive)."),
    "vpcs": ("nitro_fleet_vpcs", "VPCs defined in etcd."),
    "remotes": ("nitro_fleet_remote_interfaces", "Interfaces on other hosts this host can reach."),
}
#: Fleet counters: statistics key -> (metric name, help).
FLEET_COUNTERS = {
    "disconnects": ("nitro_fleet_etcd_disconnects", "Times the watch on etcd was lost after being established."),
    "reloads": ("nitro_fleet_reloads", "Full reads of the fleet state (the first, and after a compaction)."),
    "invalid_records": ("nitro_fleet_invalid_records", "Values under /nitro/ skipped because they break the schema."),
    "callback_errors": ("nitro_fleet_listener_errors", "Fleet changes whose listener (the switch update) raised."),
}

#: Per-worker engine counters: statistics key -> (metric name, help, nanoseconds?).
ENGINE_COUNTERS = {
    "chains": ("nitro_engine_chains", "Descriptor chains an engine worker served.", False),
    "wakeups": ("nitro_engine_wakeups", "Times an engine worker woke from its epoll sleep.", False),
    "busy_ns": ("nitro_engine_busy_seconds", "Time an engine worker spent in loop passes that moved work.", True),
    "poll_ns": ("nitro_engine_poll_seconds", "Time an engine worker busy-polled with nothing to do.", True),
    "sleep_ns": ("nitro_engine_sleep_seconds", "Time an engine worker slept waiting for kicks or I/O.", True),
    "io_submitted": ("nitro_engine_io_submitted", "io_uring requests an engine worker submitted.", False),
    "mutes": ("nitro_engine_kick_mutes", "Times an engine worker stopped waking for a ring whose kicks kept "
              "finding nothing (a kick storm; the ring is then polled every millisecond).", False),
}


#: A volume's QoS counters: statistics()["qos"] key -> (family, name, help, nanoseconds?).
BLK_QOS = {
    "exceeded_iops_ns": (
        CounterMetricFamily, "nitro_blk_qos_exceeded_iops_seconds",
        "Time requests of the volume waited for its IOPS limit (baseline or burst), like EBS's "
        "exceeded_iops.", True),
    "exceeded_throughput_ns": (
        CounterMetricFamily, "nitro_blk_qos_exceeded_throughput_seconds",
        "Time requests of the volume waited for its throughput limit, like EBS's exceeded_tp.", True),
    "credits": (GaugeMetricFamily, "nitro_blk_qos_burst_credits",
                "I/O credits in the volume's burst bucket (docs/volumes.md).", False),
    "credits_max": (GaugeMetricFamily, "nitro_blk_qos_burst_credits_max",
                    "The burst bucket's size: (burst_iops - iops) * burst_seconds.", False),
    "queued": (GaugeMetricFamily, "nitro_blk_qos_queue_length",
               "Requests the guest queued that wait for the volume's QoS budget now.", False),
    "delayed": (CounterMetricFamily, "nitro_blk_qos_delayed_requests",
                "Requests held back by the volume's QoS before they were served (never failed).", False),
}
#: ``limit`` label values of nitro_blk_qos_limit (keys of statistics()["qos"]).
BLK_QOS_LIMITS = ("iops", "throughput", "burst_iops", "burst_seconds")

#: An NBD volume's connections (a device's statistics()["remote"], summed
#: over its queues' connections): key -> (family, name, help).
BLK_REMOTE = {
    "connected": (GaugeMetricFamily, "nitro_blk_remote_connections_up",
                  "Connections to the NBD server that are up (one per queue)."),
    "connects": (CounterMetricFamily, "nitro_blk_remote_connects",
                 "Connections made to the NBD server, the first ones and every reconnect."),
    "disconnects": (CounterMetricFamily, "nitro_blk_remote_disconnects",
                    "Connections to the NBD server found dead (or hung up on after io_timeout)."),
    "resent": (CounterMetricFamily, "nitro_blk_remote_resent_requests",
               "Requests sent again on a new connection after the old one died."),
    "guest_writes": (CounterMetricFamily, "nitro_blk_remote_guest_memory_writes",
                     "Writes sent to the NBD server straight from guest memory (the others are "
                     "copied first: over TLS, encrypted, scattered or sector-splitting buffers, "
                     "or taken with no connection up)."),
}


class _Families:
    """The metric families of one scrape, built fresh each time."""

    def __init__(self) -> None:
        dk = ["device", "kind"]
        self.blk_requests = CounterMetricFamily(
            "nitro_blk_requests", "virtio-blk requests completed, by request type.", labels=["device", "op"])
        self.blk_bytes = CounterMetricFamily(
            "nitro_blk_bytes", "Bytes transferred by virtio-blk requests, by request type.", labels=["device", "op"])
        self.blk_errors = CounterMetricFamily(
            "nitro_blk_request_errors",
            "virtio-blk requests completed with a status other than VIRTIO_BLK_S_OK, by request type.",
            labels=["device", "op"])
        self.blk_inflight = GaugeMetricFamily(
            "nitro_blk_inflight_requests", "virtio-blk requests taken from the ring and not yet completed.",
            labels=["device"])
        self.blk_resubmitted = CounterMetricFamily(
            "nitro_blk_resubmitted_requests",
            "virtio-blk requests found in flight in the inflight region after a restart and served again.",
            labels=["device"])
        self.blk_duration = HistogramMetricFamily(
            "nitro_blk_request_duration_seconds",
            "Time from taking a virtio-blk request off the avail ring to publishing it on the used ring "
            "(time held back by QoS included), by request type.",
            labels=["device", "op"])
        self.blk_qos = {key: family(name, text, labels=["device"])
                        for key, (family, name, text, _) in BLK_QOS.items()}
        self.blk_qos_limit = GaugeMetricFamily(
            "nitro_blk_qos_limit", "The volume's QoS limits (0: unlimited); limit = iops, throughput "
            "(bytes/s), burst_iops, burst_seconds.", labels=["device", "limit"])
        self.blk_source_waiting = GaugeMetricFamily(
            "nitro_blk_source_waiting", "1 while a remote volume's source (NBD server, Ceph cluster) cannot "
            "be reached: the device has no socket yet and is retried in the background.", labels=["device"])
        self.blk_volume_info = GaugeMetricFamily(
            "nitro_blk_volume_info", "Always 1; the labels describe the device's volume: its image or "
            "remote source, the backend serving it (file, nbd, rbd), whether nitro encrypts it.",
            labels=["device", "volume", "backend", "encrypted"])
        self.blk_cipher_info = GaugeMetricFamily(
            "nitro_blk_cipher_info", "Always 1, for an encrypted volume only; the labels say how nitro "
            "encrypts it: the LUKS2 sector size and the XTS path it picked on this CPU (vaes512, vaes, "
            "aesni: its own; evp-iv, evp-init: OpenSSL's, slower).",
            labels=["device", "sector_size", "impl"])
        self.blk_remote = {key: family(name, text, labels=["device"])
                           for key, (family, name, text) in BLK_REMOTE.items()}
        self.blk_timeouts = CounterMetricFamily(
            "nitro_blk_timeouts", "Requests of a remote volume its storage left unanswered past io_timeout: "
            "the guest got an I/O error (counted in nitro_blk_request_errors_total too).", labels=["device"])
        self.blk_mapped_reads = CounterMetricFamily(
            "nitro_blk_mapped_reads", "Reads of an image file served from nitro's mapping of it, their pages "
            "being in the page cache: no io_uring round trip (also in nitro_blk_requests_total).",
            labels=["device"])
        self.blk_mapped_writes = CounterMetricFamily(
            "nitro_blk_mapped_writes", "Writes to an image file copied straight into nitro's mapping of it, "
            "their pages being in the page cache: no pwrite (also in nitro_blk_requests_total).",
            labels=["device"])
        self.blk_capacity = GaugeMetricFamily(
            "nitro_blk_capacity_bytes", "Size of the virtio-blk device as presented to the guest.", labels=["device"])
        self.vhost_connected = GaugeMetricFamily(
            "nitro_vhost_connected", "1 while a vhost-user frontend (QEMU) is connected to the device socket.",
            labels=dk)
        self.vhost_connections = CounterMetricFamily(
            "nitro_vhost_connections", "vhost-user frontends accepted on the device socket.", labels=dk)
        self.vhost_protocol_errors = CounterMetricFamily(
            "nitro_vhost_protocol_errors", "Malformed or out-of-order vhost-user messages from the frontend.",
            labels=dk)
        self.device_broken = GaugeMetricFamily(
            "nitro_device_broken",
            "1 when the device stopped serving after a guest fault (until the frontend resets it).",
            labels=dk)
        self.guest_errors = CounterMetricFamily(
            "nitro_guest_errors", "Guest driver faults detected on the virtqueues, by fault type (summed over queues).",
            labels=["device", "kind", "error"])
        self.vq_kicks = CounterMetricFamily(
            "nitro_virtqueue_kicks", "Kick (available buffer) notifications received from the guest.",
            labels=["device", "queue"])
        self.vq_calls = CounterMetricFamily(
            "nitro_virtqueue_calls", "Call (used buffer) notifications sent to the guest.", labels=["device", "queue"])
        self.vq_chains = CounterMetricFamily(
            "nitro_virtqueue_chains", "Descriptor chains processed.", labels=["device", "queue"])
        self.vq_worker = GaugeMetricFamily(
            "nitro_virtqueue_worker", "The engine worker serving the virtqueue (absent while it is not served).",
            labels=["device", "queue"])
        wl = ["worker"]
        self.engine_rings = GaugeMetricFamily(
            "nitro_engine_rings", "Virtqueues assigned to an engine worker.", labels=wl)
        self.engine_poll_window = GaugeMetricFamily(
            "nitro_engine_poll_window_seconds",
            "How long an engine worker busy-polls before it sleeps (adaptive unless daemon.poll_us is set).",
            labels=wl)
        self.engine_draining = GaugeMetricFamily(
            "nitro_engine_draining_rings", "Rings an engine worker is detaching that still wait for their "
            "remote server's answers (served between its other rings until answered or io_timeout).",
            labels=wl)
        self.engine = {key: CounterMetricFamily(name, text, labels=wl)
                       for key, (name, text, _) in ENGINE_COUNTERS.items()}
        self.guest_memory = GaugeMetricFamily(
            "nitro_guest_memory_mapped_bytes",
            "Guest memory every frontend's memory table maps together (capped by daemon.max_guest_memory).")
        il = ["interface"]
        self.net_packets = CounterMetricFamily(
            "nitro_net_packets", "Frames switched for a virtio-net interface; direction in = into the guest.",
            labels=["interface", "direction"])
        self.net_bytes = CounterMetricFamily(
            "nitro_net_bytes", "Ethernet bytes (no virtio header) switched for a virtio-net interface.",
            labels=["interface", "direction"])
        self.net_drops = CounterMetricFamily(
            "nitro_net_drops", "Frames the switch dropped, by reason, charged to the sending interface "
            "(no_rx_buffer: to the receiving one).", labels=["interface", "reason"])
        self.net_allowance = {
            name: CounterMetricFamily(f"nitro_net_{name}_allowance_exceeded", text, labels=il)
            for name, text in NET_ALLOWANCES.items()}
        self.net_punted = CounterMetricFamily(
            "nitro_net_punted", "Control frames (ARP, DHCP, to the gateway) handed to nitro's VPC responders.",
            labels=il)
        self.device_info = GaugeMetricFamily(
            "nitro_device_info", "Always 1; the labels describe a configured device.",
            labels=["device", "kind", "socket", "readonly"])
        vu = ["vpc", "uplink"]
        self.vpc_control_frames = CounterMetricFamily(
            "nitro_vpc_control_frames",
            "Punted control frames answered or dropped by a VPC's responder, by outcome.",
            labels=["vpc", "outcome"])
        self.vpc_punt_errors = CounterMetricFamily(
            "nitro_vpc_punt_errors",
            "Punted frames dropped because answering them raised (a nitro bug a guest can trigger; see the logs).",
            labels=["vpc"])
        self.vpc_uplink_up = GaugeMetricFamily(
            "nitro_vpc_uplink_up", "1 while the VPC's host uplink (TAP) thread is serving.", labels=vu)
        self.vpc_uplink_packets = CounterMetricFamily(
            "nitro_vpc_uplink_packets",
            "Frames through a VPC's host uplink; direction in = written to the TAP, out = read from it.",
            labels=[*vu, "direction"])
        self.vpc_uplink_bytes = CounterMetricFamily(
            "nitro_vpc_uplink_bytes", "Ethernet bytes through a VPC's host uplink.", labels=[*vu, "direction"])
        self.vpc_uplink_drops = CounterMetricFamily(
            "nitro_vpc_uplink_drops", "Frames read from a VPC's host uplink and dropped by the switch, by reason.",
            labels=[*vu, "reason"])

        self.fleet_up = GaugeMetricFamily(
            "nitro_fleet_etcd_up", "1 while the fleet's watch on etcd is established, else 0.", labels=["host"])
        self.fleet_gauges = {key: GaugeMetricFamily(name, text, labels=["host"])
                             for key, (name, text) in FLEET_GAUGES.items()}
        self.fleet_counters = {key: CounterMetricFamily(name, text, labels=["host"])
                               for key, (name, text) in FLEET_COUNTERS.items()}
        self.fleet_rekeys = CounterMetricFamily(
            "nitro_fleet_rekeys", "Times this host moved to its next key epoch (schedule, sequence space, "
            "`nitro fleet rekey`).", labels=["host"])
        self.fleet_update_errors = CounterMetricFamily(
            "nitro_fleet_datapath_update_errors", "Fleet changes the tunnel or the switch refused (a peer "
            "whose key makes no SA, a remote interface that claims a local address); see the logs.",
            labels=["host"])
        sa = ["host", "peer", "direction"]
        self.fleet_sa_epoch = GaugeMetricFamily(
            "nitro_fleet_sa_epoch", "Key epoch of the SA with a peer host: direction out = this host's "
            "sending epoch, in = the epoch the peer published.", labels=sa)
        self.fleet_sa_age = GaugeMetricFamily(
            "nitro_fleet_sa_age_seconds", "Seconds since the SA with a peer host was installed "
            "(out: this host's; in: the one of the peer's published epoch).", labels=sa)
        self.fleet_volume_lock = GaugeMetricFamily(
            "nitro_fleet_volume_lock", "1 for each NBD volume whose lock in etcd this host holds for a "
            "device (docs/volumes.md \"One host at a time\").", labels=["host", "device", "volume"])
        self.fleet_underlay_up = GaugeMetricFamily(
            "nitro_fleet_underlay_up", "1 while the underlay ring (frames from other hosts) is served by "
            "an engine worker.", labels=["host"])
        self.fleet_peer_packets = CounterMetricFamily(
            "nitro_fleet_peer_packets", "Guest frames carried across the underlay to (direction out) and "
            "delivered from (in) a peer host.", labels=sa)
        self.fleet_peer_bytes = CounterMetricFamily(
            "nitro_fleet_peer_bytes", "Ethernet bytes of those frames.", labels=sa)
        self.fleet_peer_drops = CounterMetricFamily(
            "nitro_fleet_peer_drops", "Packets to or from a peer host dropped, by reason (docs/fleet.md: the "
            "tunnel's auth, replay, unknown_spi, wrong_vni, mtu, ... and the switch's spoofed_source, "
            "unknown_destination, ...).", labels=["host", "peer", "reason"])
        self.fleet_underlay_drops = CounterMetricFamily(
            "nitro_fleet_underlay_drops", "Every packet the underlay dropped, by reason, including those "
            "that name no known peer (an unknown SPI or source, a malformed packet).",
            labels=["host", "reason"])

    def all(self) -> list[Metric]:
        out: list[Metric] = []
        for value in vars(self).values():
            out += value.values() if isinstance(value, dict) else [value]
        return out


def _labels(*values: Any) -> list[str]:
    return [str(v) for v in values]


def _cumulative_buckets(per_bucket: Sequence[Sequence[float]]) -> tuple[list[tuple[str, float]], float]:
    """Per-bucket counts [(upper_bound, n), ...] -> Prometheus cumulative
    buckets [("0.001", n0), ("0.005", n0+n1), ..., ("+Inf", total)] and total."""
    buckets: list[tuple[str, float]] = []
    total = 0.0
    previous = -math.inf
    for bound, count in per_bucket:
        bound = float(bound)
        if not bound > previous:
            raise ValueError(f"latency bucket bounds not increasing at {bound!r}")
        if count < 0:
            raise ValueError(f"negative latency bucket count {count!r}")
        previous = bound
        total += count
        buckets.append((floatToGoString(bound), total))
    if not buckets or previous != math.inf:
        buckets.append(("+Inf", total))
    return buckets, total


def _add_device(f: _Families, stats: dict) -> None:
    """Add one device's samples. Reads everything it needs before adding
    anything, so a malformed dict raises without leaving half a device."""
    dev = str(stats["id"])
    kind = str(stats["kind"])
    dk = _labels(dev, kind)
    adds: list[tuple[Metric, list[str], float]] = [
        (f.device_info, _labels(dev, kind, stats.get("socket", ""),
                                str(bool(stats.get("readonly", False))).lower()), 1),
        (f.vhost_connected, dk, 1 if stats["connected"] else 0),
        (f.vhost_connections, dk, stats.get("connections", 0)),
        (f.vhost_protocol_errors, dk, stats.get("protocol_errors", 0)),
        (f.device_broken, dk, 1 if stats.get("broken") else 0),
    ]

    faults = dict.fromkeys(GUEST_ERRORS, 0)
    for q in stats.get("queues", ()):
        qlabel = _labels(dev, q["index"])
        adds += [(f.vq_kicks, qlabel, q["kicks"]), (f.vq_calls, qlabel, q["calls"]), (f.vq_chains, qlabel, q["chains"])]
        if q.get("worker") is not None:
            adds.append((f.vq_worker, qlabel, q["worker"]))
        for name, n in q.get("faults", {}).items():
            faults[name] = faults.get(name, 0) + n
    adds += [(f.guest_errors, _labels(dev, kind, name), n) for name, n in faults.items()]

    histograms: list[tuple[list[str], list, float]] = []
    if kind == "blk":
        ops = stats.get("ops", {})
        for op in dict.fromkeys((*BLK_OPS, *ops)):
            counts = ops.get(op, {})
            oplabel = _labels(dev, op)
            adds += [
                (f.blk_requests, oplabel, counts.get("requests", 0)),
                (f.blk_bytes, oplabel, counts.get("bytes", 0)),
                (f.blk_errors, oplabel, counts.get("errors", 0)),
            ]
        adds.append((f.blk_inflight, [dev], stats.get("inflight", 0)))
        adds.append((f.blk_resubmitted, [dev], stats.get("resubmitted", 0)))
        adds.append((f.blk_timeouts, [dev], stats.get("timeouts", 0)))
        adds.append((f.blk_mapped_reads, [dev], stats.get("mapped_reads", 0)))
        adds.append((f.blk_mapped_writes, [dev], stats.get("mapped_writes", 0)))
        if "volume" in stats:
            adds.append((f.blk_volume_info, _labels(dev, stats["volume"], stats.get("backend", ""),
                                                    str(bool(stats.get("encrypted"))).lower()), 1))
        cipher = stats.get("cipher")
        if isinstance(cipher, dict):
            adds.append((f.blk_cipher_info, _labels(dev, str(cipher.get("sector_size", "")),
                                                    cipher.get("impl", "")), 1))
        remote = stats.get("remote")
        if isinstance(remote, dict):
            adds += [(f.blk_remote[key], [dev], remote.get(key, 0)) for key in BLK_REMOTE]
        if "capacity_bytes" in stats:
            adds.append((f.blk_capacity, [dev], stats["capacity_bytes"]))
        for op, h in stats.get("latency", {}).items():
            buckets, _ = _cumulative_buckets(h["buckets"])
            histograms.append(([dev, str(op)], buckets, float(h["sum_seconds"])))
        qos = stats.get("qos")
        if qos is not None:
            adds += [(f.blk_qos[key], [dev], qos[key] / 1e9 if ns else qos[key])
                     for key, (_, _, _, ns) in BLK_QOS.items()]
            adds += [(f.blk_qos_limit, [dev, limit], qos[limit]) for limit in BLK_QOS_LIMITS]

    if kind == "net" and isinstance(stats.get("net"), dict):
        net = stats["net"]
        for direction in ("in", "out"):
            adds += [(f.net_packets, [dev, direction], net[f"packets_{direction}"]),
                     (f.net_bytes, [dev, direction], net[f"bytes_{direction}"])]
        # C reports every reason, at 0 too: the dict is the vocabulary.
        adds += [(f.net_drops, [dev, reason], n) for reason, n in net.get("drops", {}).items()]
        adds += [(family, [dev], net[f"{name}_allowance_exceeded"]) for name, family in f.net_allowance.items()]
        adds.append((f.net_punted, [dev], net.get("punted", 0)))

    _add_all(adds)
    for labels, buckets, total in histograms:
        f.blk_duration.add_metric(labels, buckets, total)


def _add_all(adds: list[tuple[Metric, list[str], Any]]) -> None:
    values = [(family, labels, float(value)) for family, labels, value in adds]  # raises on non-numbers
    for family, labels, value in values:
        family.add_metric(labels, value)


def _add_engine(f: _Families, stats: dict) -> None:
    """Engine.statistics(): one series per worker; all or nothing."""
    adds: list[tuple[Metric, list[str], Any]] = [(f.guest_memory, [], stats["guest_memory_bytes"])]
    for w in stats["workers"]:
        label = [str(w["id"])]
        adds += [(f.engine_rings, label, w["rings"]), (f.engine_poll_window, label, w["poll_us"] / 1e6),
                 (f.engine_draining, label, w["draining"])]
        for key, (_, _, ns) in ENGINE_COUNTERS.items():
            adds.append((f.engine[key], label, w[key] / 1e9 if ns else w[key]))
    _add_all(adds)


def _add_vpc(f: _Families, vpc_id: str, stats: dict) -> None:
    """One VPC (NetFabric.statistics()[vpc_id]); all or nothing like _add_device."""
    vpc = str(vpc_id)
    adds: list[tuple[Metric, list[str], Any]] = [
        (f.vpc_control_frames, [vpc, outcome], n) for outcome, n in stats["counters"].items()]
    adds.append((f.vpc_punt_errors, [vpc], stats.get("punt_errors", 0)))
    up = stats.get("uplink")
    if up is not None:
        vu = [vpc, str(up["name"])]
        adds.append((f.vpc_uplink_up, vu, 1 if up.get("state") == "up" else 0))
        for direction in ("in", "out"):
            adds += [(f.vpc_uplink_packets, [*vu, direction], up[f"packets_{direction}"]),
                     (f.vpc_uplink_bytes, [*vu, direction], up[f"bytes_{direction}"])]
        adds += [(f.vpc_uplink_drops, [*vu, reason], n) for reason, n in up.get("drops", {}).items()]
    _add_all(adds)


def _add_fleet(f: _Families, stats: dict) -> None:
    """FleetNode.statistics(); all or nothing."""
    host = [str(stats["host"])]
    adds: list[tuple[Metric, list[str], Any]] = [(f.fleet_up, host, 1 if stats["etcd"] == "up" else 0)]
    adds += [(f.fleet_gauges[key], host, stats[key]) for key in FLEET_GAUGES]
    adds += [(f.fleet_counters[key], host, stats[key]) for key in FLEET_COUNTERS]
    if "rekeys" in stats:
        adds.append((f.fleet_rekeys, host, stats["rekeys"]))
    if "tunnel_errors" in stats:
        adds.append((f.fleet_update_errors, host, stats["tunnel_errors"]))
    for sa in stats.get("sas", ()):
        for direction in ("out", "in"):
            info = sa[direction]
            if info:
                labels = [*host, str(sa["peer"]), direction]
                adds += [(f.fleet_sa_epoch, labels, info["epoch"]), (f.fleet_sa_age, labels, info["age_ns"] / 1e9)]
    adds += [(f.fleet_volume_lock, [*host, str(d), str(v)], 1)
             for d, v in (stats.get("volume_locks") or {}).items()]
    if stats.get("datapath"):
        adds += _fleet_datapath(f, host, stats["datapath"])
    _add_all(adds)


def _fleet_datapath(f: _Families, host: list[str], u: dict) -> list[tuple[Metric, list[str], Any]]:
    """Underlay.statistics(): the ring, per peer host packets/bytes/drops."""
    adds: list[tuple[Metric, list[str], Any]] = [(f.fleet_underlay_up, host, 1 if u["state"] == "up" else 0)]
    for peer, p in u["peers"].items():
        for direction in ("in", "out"):
            labels = [*host, str(peer), direction]
            adds += [(f.fleet_peer_packets, labels, p[f"packets_{direction}"]),
                     (f.fleet_peer_bytes, labels, p[f"bytes_{direction}"])]
        adds += [(f.fleet_peer_drops, [*host, str(peer), reason], n) for reason, n in p["drops"].items()]
    totals: dict[str, int] = {}
    for part in u["drops"].values():  # the tunnel's and the switch's
        for reason, n in part.items():
            totals[reason] = totals.get(reason, 0) + n
    adds += [(f.fleet_underlay_drops, [*host, reason], n) for reason, n in totals.items()]
    return adds


def _add_waiting(f: _Families, stats: dict) -> None:
    for w in stats["devices"]:
        f.blk_source_waiting.add_metric(_labels(w["id"]), 1)


class NitroCollector(Collector):
    """Reads ``statistics()`` of every device from ``get_devices()`` at each
    scrape. ``get_devices`` is called in the metrics HTTP thread; it should
    return a snapshot (e.g. ``lambda: list(daemon.devices)``). ``devices_lock``,
    when given, is held while the devices are listed and read: the daemon
    holds it while it closes a device a reload removed, so a scrape never
    reads C counters that are being freed."""

    def __init__(self, get_devices: GetDevices, get_vpcs: GetVpcs | None = None,
                 version: str = __version__, *,
                 devices_lock: AbstractContextManager[Any] | None = None,
                 get_engine: GetEngine | None = None, get_fleet: GetFleet | None = None,
                 get_waiting: GetWaiting | None = None) -> None:
        self._get_devices = get_devices
        self._get_waiting = get_waiting
        self._get_fleet = get_fleet
        self._get_engine = get_engine
        self._devices_lock = devices_lock if devices_lock is not None else contextlib.nullcontext()
        self._get_vpcs = get_vpcs
        self._version = version
        self._lock = threading.Lock()  # scrapes may run concurrently (one thread per request)
        self._collect_errors = 0
        self._failing: dict[str, str] = {}  # device -> last error, to log each failure once

    def _record_failure(self, key: str, what: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._collect_errors += 1
            first = self._failing.get(key) != message
            self._failing[key] = message
        # Once per distinct error, not every 15 s; the counter keeps the rate.
        log.log(logging.WARNING if first else logging.DEBUG, "metrics: %s failed, skipped in this scrape",
                what, exc_info=exc if first else None, extra={"fields": {"device": key, "error": message}})

    def _record_success(self, key: str) -> None:
        with self._lock:
            if self._failing.pop(key, None) is not None:
                log.info("metrics: statistics of %s readable again", key, extra={"fields": {"device": key}})

    def _collect_vpcs(self, families: _Families) -> None:
        if self._get_vpcs is None:
            return
        try:
            vpcs = self._get_vpcs()
            if not isinstance(vpcs, dict):
                raise TypeError(f"VPC statistics are {type(vpcs).__name__}, not dict")
        except Exception as exc:
            self._record_failure("<vpcs>", "listing VPC statistics", exc)
            return
        self._record_success("<vpcs>")
        for vpc_id, stats in vpcs.items():
            key = f"vpc {vpc_id}"
            try:
                _add_vpc(families, vpc_id, stats)
            except Exception as exc:
                self._record_failure(key, f"statistics of {key}", exc)
            else:
                self._record_success(key)

    def _collect_section(self, families: _Families, key: str, what: str,
                         get: Callable[[], dict | None] | None, add: Callable[[_Families, dict], None]) -> None:
        """One part beyond the devices (engine, fleet): absent when ``get``
        is None or returns None; a failure is recorded like a device's."""
        if get is None:
            return
        try:
            stats = get()
            if stats is not None:
                add(families, stats)
        except Exception as exc:
            self._record_failure(key, what, exc)
        else:
            self._record_success(key)

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        # Every C counter is read under the lock: the daemon frees devices,
        # the switch and the engine under it (a scrape's thread may outlive
        # the metrics server's shutdown at a stop).
        with self._devices_lock:
            self._collect_devices(families)
            self._collect_vpcs(families)
            self._collect_section(families, "<engine>", "engine statistics", self._get_engine,
                                  _add_engine)
            self._collect_section(families, "<fleet>", "fleet statistics", self._get_fleet,
                                  _add_fleet)
            get_waiting = self._get_waiting
            if get_waiting is not None:
                self._collect_section(families, "<waiting>", "waiting devices",
                                      lambda: {"devices": get_waiting()}, _add_waiting)

        yield from families.all()

        info = GaugeMetricFamily("nitro_build_info", "Always 1; the version label is the running nitro.",
                                 labels=["version"])
        info.add_metric([self._version], 1)
        yield info
        with self._lock:
            errors = self._collect_errors
        yield CounterMetricFamily(
            "nitro_metrics_collect_errors",
            "Devices (or VPCs) left out of a scrape because reading their statistics failed (see the logs).",
            value=errors)

    def _collect_devices(self, families: _Families) -> None:
        try:
            devices = list(self._get_devices())
        except Exception as exc:
            self._record_failure("<devices>", "listing devices", exc)
            devices = []
        for index, device in enumerate(devices):
            key = str(getattr(device, "id", None) or f"#{index}")
            try:
                stats = device.statistics()
                key = str(stats.get("id", key)) if isinstance(stats, dict) else key
                if not isinstance(stats, dict):
                    raise TypeError(f"statistics() returned {type(stats).__name__}, not dict")
                _add_device(families, stats)
            except Exception as exc:
                self._record_failure(key, f"statistics() of device {key}", exc)
            else:
                self._record_success(key)


def make_registry(get_devices: GetDevices, get_vpcs: GetVpcs | None = None, *,
                  process_metrics: bool = True,
                  devices_lock: AbstractContextManager[Any] | None = None,
                  get_engine: GetEngine | None = None, get_fleet: GetFleet | None = None,
                  get_waiting: GetWaiting | None = None) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one) holding the
    nitro collector and, by default, the standard ``process_*`` metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NitroCollector(get_devices, get_vpcs, devices_lock=devices_lock, get_engine=get_engine,
                                     get_fleet=get_fleet, get_waiting=get_waiting))
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9180"`` -> ``("127.0.0.1", 9180)``; ``"[::1]:9180"`` ->
    ``("::1", 9180)``; ``":9180"`` -> all IPv4 addresses; ``""`` -> None
    (metrics disabled). Anything else raises ValueError saying what is wrong.
    Port 0 picks a free port (tests)."""
    if not isinstance(listen, str):
        raise ValueError(f"metrics listen address must be a string like '127.0.0.1:9180', not {listen!r}")
    text = listen.strip()
    if not text:
        return None
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid metrics listen address {listen!r}: expected '[IPV6]:PORT', e.g. '[::1]:9180'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid metrics listen address {listen!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid metrics listen address {listen!r}: expected 'HOST:PORT', e.g. '127.0.0.1:9180'")
        if ":" in host:
            raise ValueError(
                f"invalid metrics listen address {listen!r}: put an IPv6 address in brackets, e.g. '[::1]:9180'")
        host = host or "0.0.0.0"
        if any(c.isspace() for c in host):
            raise ValueError(f"invalid metrics listen address {listen!r}: host contains whitespace")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid metrics listen address {listen!r}: port {port_text!r} is not a number 0-65535")
    return host, int(port_text)


def start_metrics_server(listen: str, get_devices: GetDevices, get_vpcs: GetVpcs | None = None, *,
                         devices_lock: AbstractContextManager[Any] | None = None,
                         get_engine: GetEngine | None = None, get_fleet: GetFleet | None = None,
                         get_waiting: GetWaiting | None = None):
    """Serve ``/metrics`` on ``listen`` (see :func:`parse_listen`) from a
    private registry, in prometheus-client's own daemon thread.

    Returns ``(server, thread)``, or None when ``listen`` is ``""``. Stop it
    with ``server.shutdown(); server.server_close()``; ``server.server_port``
    is the bound port. Raises ValueError for a malformed address and OSError
    (with the address in the message) when it cannot bind.
    """
    parsed = parse_listen(listen)
    if parsed is None:
        return None
    host, port = parsed
    registry = make_registry(get_devices, get_vpcs, devices_lock=devices_lock, get_engine=get_engine,
                             get_fleet=get_fleet, get_waiting=get_waiting)
    try:
        started = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
    if started is None:  # prometheus-client < 0.17 returned nothing
        raise RuntimeError("prometheus-client >= 0.17 is required (start_http_server must return the server)")
    server, thread = started
    log.info("metrics listening", extra={"fields": {"listen": listen, "port": server.server_port}})
    return server, thread
