"""Status replies as the daemon builds them: one blk device's statistics()
and a "vpcs" section, shared by the control and status formatting tests."""

INF = float("inf")


def blk_stats(dev="vol0", **over):
    faults = {k: 0 for k in ("avail_idx", "desc_index", "desc_addr", "desc_loop", "indirect", "desc_order", "request")}
    stats = {
        "id": dev, "kind": "blk", "socket": f"/run/nitro/{dev}.sock", "connected": True, "broken": None,
        "features": 0x130000044, "protocol_features": 0x8 | 0x200, "readonly": False,
        "capacity_bytes": 1 << 30,
        "queues": [{"index": 0, "enabled": True, "running": True, "worker": 1, "kicks": 11, "calls": 10, "chains": 12,
                    "faults": {**faults, "desc_loop": 1}}],
        "ops": {"in": {"requests": 7, "bytes": 28672, "errors": 0}, "out": {"requests": 2, "bytes": 8192, "errors": 1},
                "flush": {"requests": 1, "bytes": 0, "errors": 0}},
        "latency_buckets": [(2.5e-05, 4), (5e-05, 5), (INF, 1)],
        "latency_sum_seconds": 0.0005, "inflight": 0, "protocol_errors": 0, "connections": 1,
    }
    stats.update(over)
    return stats


VPCS = {
    "blue": {"id": "blue", "counters": {"arp_replies": 2, "dhcp_acks": 1, "unknown": 0}, "leases": {},
             "punt_errors": 3,
             "uplink": {"name": "nv0", "state": "down", "error": "HostError: poll failed", "packets_in": 4,
                        "bytes_in": 400, "packets_out": 5, "bytes_out": 500}},
    "red": {"id": "red", "counters": {"arp_replies": 0}, "leases": {}, "punt_errors": 0},
}

ENGINE = {"blk_io": "io_uring", "poll_us": "adaptive",
          "workers": [{"id": 0, "cpu": None, "ring_labels": ["vol0/0"], "rings": 1, "draining": 1, "chains": 40, "wakeups": 3,
                       "busy_ns": 1_500_000_000, "poll_ns": 250_000_000, "sleep_ns": 9_000_000_000,
                       "io_submitted": 30, "poll_us": 80, "uring": 1},
                      {"id": 1, "cpu": None, "ring_labels": [], "rings": 0, "chains": 0, "wakeups": 1,
                       "busy_ns": 0, "poll_ns": 0, "sleep_ns": 10_000_000_000, "io_submitted": 0, "poll_us": 0,
                       "uring": 1}]}
