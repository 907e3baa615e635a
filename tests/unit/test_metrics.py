"""The metrics endpoint, scraped over real HTTP from fake devices."""

import logging
import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import nitro
from nitro.metrics import BLK_OPS, GUEST_ERRORS, NitroCollector, parse_listen, start_metrics_server

INF = float("inf")


def blk_stats(dev="vol0", **over):
    faults = dict.fromkeys(GUEST_ERRORS, 0)
    stats = {
        "id": dev, "kind": "blk", "socket": f"/run/nitro/{dev}.sock", "connected": True, "broken": None,
        "features": 0x130000044, "protocol_features": 0x8, "readonly": False,
        "capacity_bytes": 1 << 30,
        "queues": [
            {"index": 0, "enabled": True, "running": True, "kicks": 10, "calls": 9, "chains": 12,
             "faults": {**faults, "desc_loop": 1}},
            {"index": 1, "enabled": True, "running": False, "kicks": 5, "calls": 4, "chains": 6,
             "faults": {**faults, "desc_loop": 2, "indirect": 3}},
        ],
        "ops": {op: {"requests": 0, "bytes": 0, "errors": 0} for op in BLK_OPS},
        "latency": {
            "in": {"buckets": [(2.5e-05, 1), (5e-05, 2), (1e-04, 0), (1e-03, 4), (INF, 1)], "sum_seconds": 0.0125},
            "flush": {"buckets": [(2.5e-05, 0), (5e-05, 0), (1e-04, 0), (1e-03, 0), (INF, 2)], "sum_seconds": 3.5},
        },
        "inflight": 3, "resubmitted": 2, "timeouts": 0, "mapped_reads": 5, "mapped_writes": 6,
        "volume": f"/srv/vm/{dev}.img", "backend": "file", "encrypted": False, "mapped": True,
        "qos": {"iops": 2000, "throughput": 0, "burst_iops": 3000, "burst_seconds": 60,
                "exceeded_iops_ns": 1_500_000_000, "exceeded_throughput_ns": 0, "credits": 12345,
                "credits_max": 60000, "queued": 7, "delayed": 99},
        "protocol_errors": 2, "connections": 4,
    }
    stats["ops"]["in"] = {"requests": 7, "bytes": 7 * 4096, "errors": 1}
    stats["ops"]["out"] = {"requests": 1, "bytes": 512, "errors": 0}
    stats.update(over)
    return stats


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats
        self.id = stats["id"] if isinstance(stats, dict) else None

    def statistics(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


@pytest.fixture
def serve():
    """serve(devices) -> base URL of a real metrics server on a free port."""
    servers = []

    def start(get_devices, listen="127.0.0.1:0", get_vpcs=None):
        server, thread = start_metrics_server(listen, get_devices, get_vpcs)
        servers.append((server, thread))
        host = "[::1]" if listen.startswith("[") else "127.0.0.1"
        return f"http://{host}:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def scrape(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore $http_proxy
    with opener.open(url + "/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams, name):
    """{frozenset(labels.items()): value} of the samples called `name`."""
    out = {}
    for f in fams.values():
        for s in f.samples:
            if s.name == name:
                out[frozenset(s.labels.items())] = s.value
    return out


def value(fams, name, **labels):
    return samples(fams, name)[frozenset(labels.items())]


def test_scrape_blk_device(serve):
    fams = families(scrape(serve(lambda: [FakeDevice(blk_stats())])))

    types = {
        "nitro_blk_requests": "counter", "nitro_blk_bytes": "counter", "nitro_blk_request_errors": "counter",
        "nitro_blk_inflight_requests": "gauge", "nitro_blk_request_duration_seconds": "histogram",
        "nitro_vhost_connected": "gauge", "nitro_vhost_connections": "counter",
        "nitro_vhost_protocol_errors": "counter", "nitro_device_broken": "gauge", "nitro_guest_errors": "counter",
        "nitro_virtqueue_kicks": "counter", "nitro_virtqueue_calls": "counter", "nitro_virtqueue_chains": "counter",
        "nitro_device_info": "gauge", "nitro_blk_capacity_bytes": "gauge", "nitro_build_info": "gauge",
        "nitro_metrics_collect_errors": "counter",
    }
    for name, kind in types.items():
        assert fams[name].type == kind, name

    assert value(fams, "nitro_blk_requests_total", device="vol0", op="in") == 7
    assert value(fams, "nitro_blk_bytes_total", device="vol0", op="in") == 7 * 4096
    assert value(fams, "nitro_blk_request_errors_total", device="vol0", op="in") == 1
    assert value(fams, "nitro_blk_requests_total", device="vol0", op="out") == 1
    # Every op label exists from the start, at 0.
    assert {dict(k)["op"] for k in samples(fams, "nitro_blk_requests_total")} == set(BLK_OPS)
    assert value(fams, "nitro_blk_requests_total", device="vol0", op="write_zeroes") == 0
    assert value(fams, "nitro_blk_inflight_requests", device="vol0") == 3
    assert value(fams, "nitro_blk_resubmitted_requests_total", device="vol0") == 2
    assert value(fams, "nitro_blk_capacity_bytes", device="vol0") == 1 << 30

    dk = {"device": "vol0", "kind": "blk"}
    assert value(fams, "nitro_vhost_connected", **dk) == 1
    assert value(fams, "nitro_vhost_connections_total", **dk) == 4
    assert value(fams, "nitro_vhost_protocol_errors_total", **dk) == 2
    assert value(fams, "nitro_device_broken", **dk) == 0

    errors = {dict(k)["error"]: v for k, v in samples(fams, "nitro_guest_errors_total").items()}
    assert errors == {**dict.fromkeys(GUEST_ERRORS, 0), "desc_loop": 3, "indirect": 3}

    assert value(fams, "nitro_virtqueue_kicks_total", device="vol0", queue="0") == 10
    assert value(fams, "nitro_virtqueue_calls_total", device="vol0", queue="1") == 4
    assert value(fams, "nitro_virtqueue_chains_total", device="vol0", queue="1") == 6

    assert value(fams, "nitro_device_info", device="vol0", kind="blk", socket="/run/nitro/vol0.sock",
                 readonly="false") == 1
    assert value(fams, "nitro_build_info", version=nitro.__version__) == 1
    assert value(fams, "nitro_metrics_collect_errors_total") == 0


def test_histogram_buckets_are_cumulative(serve):
    fams = families(scrape(serve(lambda: [FakeDevice(blk_stats())])))
    buckets = {dict(k)["le"]: v for k, v in samples(fams, "nitro_blk_request_duration_seconds_bucket").items()
               if dict(k)["op"] == "in"}
    assert buckets == {"2.5e-05": 1, "5e-05": 3, "0.0001": 3, "0.001": 7, "+Inf": 8}
    assert value(fams, "nitro_blk_request_duration_seconds_count", device="vol0", op="in") == 8
    assert value(fams, "nitro_blk_request_duration_seconds_sum", device="vol0", op="in") == pytest.approx(0.0125)
    # One histogram per operation.
    assert value(fams, "nitro_blk_request_duration_seconds_count", device="vol0", op="flush") == 2
    assert value(fams, "nitro_blk_request_duration_seconds_sum", device="vol0", op="flush") == 3.5


def test_qos_counters(serve):
    fams = families(scrape(serve(lambda: [FakeDevice(blk_stats())])))
    assert value(fams, "nitro_blk_qos_exceeded_iops_seconds_total", device="vol0") == 1.5
    assert value(fams, "nitro_blk_qos_exceeded_throughput_seconds_total", device="vol0") == 0
    assert value(fams, "nitro_blk_qos_burst_credits", device="vol0") == 12345
    assert value(fams, "nitro_blk_qos_burst_credits_max", device="vol0") == 60000
    assert value(fams, "nitro_blk_qos_queue_length", device="vol0") == 7
    assert value(fams, "nitro_blk_qos_delayed_requests_total", device="vol0") == 99
    assert value(fams, "nitro_blk_qos_limit", device="vol0", limit="iops") == 2000
    assert value(fams, "nitro_blk_qos_limit", device="vol0", limit="burst_seconds") == 60


def test_volume_info_and_remote_counters(serve):
    remote = {"connections": 2, "connected": 1, "connects": 3, "disconnects": 2, "resent": 5, "timeouts": 4}
    nbd = blk_stats("vol1", volume="nbd://10.0.0.5:10809/vol1", backend="nbd", encrypted=True,
                    cipher={"sector_size": 512, "impl": "vaes512"}, timeouts=4, remote=remote)
    fams = families(scrape(serve(lambda: [FakeDevice(blk_stats("vol0")), FakeDevice(nbd)])))
    assert fams["nitro_blk_volume_info"].type == "gauge"
    assert value(fams, "nitro_blk_volume_info", device="vol0", volume="/srv/vm/vol0.img",
                 backend="file", encrypted="false") == 1
    assert value(fams, "nitro_blk_volume_info", device="vol1", volume="nbd://10.0.0.5:10809/vol1",
                 backend="nbd", encrypted="true") == 1
    assert value(fams, "nitro_blk_cipher_info", device="vol1", sector_size="512", impl="vaes512") == 1
    assert [s for s in fams["nitro_blk_cipher_info"].samples if s.labels["device"] == "vol0"] == []
    assert value(fams, "nitro_blk_timeouts_total", device="vol0") == 0
    assert value(fams, "nitro_blk_mapped_reads_total", device="vol0") == 5
    assert value(fams, "nitro_blk_mapped_writes_total", device="vol0") == 6
    remote_samples = {"nitro_blk_timeouts_total": 4, "nitro_blk_remote_connections_up": 1,
                      "nitro_blk_remote_connects_total": 3, "nitro_blk_remote_disconnects_total": 2,
                      "nitro_blk_remote_resent_requests_total": 5}
    assert {name: value(fams, name, device="vol1") for name in remote_samples} == remote_samples
    # a local volume has no connection to report
    assert {dict(k)["device"] for k in samples(fams, "nitro_blk_remote_connects_total")} == {"vol1"}


def test_histogram_without_inf_bucket_gets_one(serve):
    stats = blk_stats(latency={"in": {"buckets": [(0.001, 2), (0.01, 3)], "sum_seconds": 0.0}})
    fams = families(scrape(serve(lambda: [FakeDevice(stats)])))
    buckets = {dict(k)["le"]: v for k, v in samples(fams, "nitro_blk_request_duration_seconds_bucket").items()}
    assert buckets == {"0.001": 2, "0.01": 5, "+Inf": 5}


def test_raising_device_is_skipped(serve, caplog):
    devices = [
        FakeDevice(blk_stats("vol0")),
        FakeDevice(RuntimeError("C counters unavailable")),
        FakeDevice(blk_stats("vol2", queues="not a list")),  # malformed: skipped whole
        FakeDevice(blk_stats("vol3", connected=True, broken="desc_loop", readonly=True)),
    ]
    devices[1].id = "vol1"
    url = serve(lambda: devices)
    with caplog.at_level(logging.DEBUG, logger="nitro.metrics"):
        fams = families(scrape(url))
        scrape(url)
    connected = samples(fams, "nitro_vhost_connected")
    assert {dict(k)["device"] for k in connected} == {"vol0", "vol3"}
    # Nothing half-added from the malformed device.
    for fam in fams.values():
        for s in fam.samples:
            assert s.labels.get("device") not in ("vol1", "vol2"), s
    assert value(fams, "nitro_device_broken", device="vol3", kind="blk") == 1
    assert value(fams, "nitro_device_info", device="vol3", kind="blk", socket="/run/nitro/vol3.sock",
                 readonly="true") == 1
    assert value(fams, "nitro_metrics_collect_errors_total") == 2
    # Logged at WARNING once per device, not on every scrape.
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(r.fields["device"] for r in warned) == ["vol1", "vol2"]
    assert "C counters unavailable" in caplog.text


def test_get_devices_raising_still_scrapes(serve):
    def broken():
        raise RuntimeError("daemon not ready")

    fams = families(scrape(serve(broken)))
    assert value(fams, "nitro_build_info", version=nitro.__version__) == 1
    assert value(fams, "nitro_metrics_collect_errors_total") == 1


def test_no_devices_and_non_blk_kind(serve):
    net = {"id": "net0", "kind": "net", "socket": "/run/nitro/net0.sock", "connected": False, "broken": None,
           "features": 0, "protocol_features": 0, "readonly": False,
           "queues": [{"index": 0, "enabled": False, "running": False, "kicks": 0, "calls": 0, "chains": 0,
                       "faults": {}}],
           "protocol_errors": 0, "connections": 0}
    fams = families(scrape(serve(lambda: [FakeDevice(net)])))
    assert value(fams, "nitro_vhost_connected", device="net0", kind="net") == 0
    assert not samples(fams, "nitro_blk_requests_total")
    # Error labels exist even when the queue reports none.
    assert len(samples(fams, "nitro_guest_errors_total")) == len(GUEST_ERRORS)

    fams = families(scrape(serve(lambda: [])))
    assert samples(fams, "nitro_build_info")


def test_process_metrics_and_private_registry(serve):
    from prometheus_client import REGISTRY

    text = scrape(serve(lambda: [FakeDevice(blk_stats())]))
    assert "process_open_fds" in text
    names = {m.name for m in REGISTRY.collect()}
    assert not any(n.startswith("nitro_") for n in names)  # the global registry stays untouched


def test_ipv6_listen(serve):
    fams = families(scrape(serve(lambda: [], listen="[::1]:0")))
    assert samples(fams, "nitro_build_info")


def test_empty_listen_disables():
    assert start_metrics_server("", lambda: []) is None
    assert parse_listen("  ") is None


@pytest.mark.parametrize(
    "listen, expected",
    [
        ("127.0.0.1:9180", ("127.0.0.1", 9180)),
        ("[::1]:9180", ("::1", 9180)),
        ("[::]:0", ("::", 0)),
        (":9180", ("0.0.0.0", 9180)),
        ("localhost:9180", ("localhost", 9180)),
    ],
)
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen, message",
    [
        ("127.0.0.1", "expected 'HOST:PORT'"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:70000", "is not a number"),
        ("127.0.0.1:-1", "is not a number"),
        ("::1:9180", "put an IPv6 address in brackets"),
        ("[::1]", "expected '[IPV6]:PORT'"),
        ("[nope]:9180", "is not an IPv6 address"),
        ("a b:9180", "whitespace"),
    ],
)
def test_bad_listen(listen, message):
    with pytest.raises(ValueError, match="invalid metrics listen address") as info:
        start_metrics_server(listen, lambda: [])
    assert message in str(info.value)


def test_bind_failure_names_the_address(serve):
    url = serve(lambda: [])
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
        start_metrics_server(f"127.0.0.1:{port}", lambda: [])


def test_collector_directly():
    fams = {m.name: m for m in NitroCollector(lambda: [FakeDevice(blk_stats())]).collect()}
    hist = fams["nitro_blk_request_duration_seconds"]
    inf = [s for s in hist.samples if s.labels.get("le") == "+Inf" and s.labels["op"] == "in"]
    count = [s for s in hist.samples if s.name.endswith("_count") and s.labels["op"] == "in"]
    assert inf[0].value == count[0].value == 8
    assert not math.isnan(fams["nitro_blk_inflight_requests"].samples[0].value)


def net_stats(dev="web", **over):
    drops = {"no_rx_buffer": 1, "spoofed_source": 2, "unknown_destination": 0, "bad_header": 0, "mtu": 0,
             "punt_overflow": 0, "a_new_reason": 7}
    stats = {"id": dev, "kind": "net", "socket": f"/run/nitro/{dev}.sock", "connected": True, "broken": None,
             "queues": [], "protocol_errors": 0, "connections": 1,
             "net": {"packets_in": 10, "bytes_in": 1000, "packets_out": 20, "bytes_out": 2000, "drops": drops,
                     "bw_in_allowance_exceeded": 3, "bw_out_allowance_exceeded": 4,
                     "pps_allowance_exceeded": 5, "linklocal_allowance_exceeded": 8, "punted": 6}}
    stats.update(over)
    return stats


def vpc_stats(**over):
    stats = {"id": "blue", "counters": {"arp_replies": 2, "dhcp_acks": 1, "unknown": 0}, "leases": {},
             "punt_errors": 3,
             "uplink": {"name": "nv0", "state": "up", "packets_in": 4, "bytes_in": 400, "packets_out": 5,
                        "bytes_out": 500, "drops": {"mtu": 1, "bad_header": 0}}}
    stats.update(over)
    return stats


def test_scrape_net_device(serve):
    fams = families(scrape(serve(lambda: [FakeDevice(net_stats())])))
    assert value(fams, "nitro_net_packets_total", interface="web", direction="in") == 10
    assert value(fams, "nitro_net_bytes_total", interface="web", direction="out") == 2000
    drops = {dict(k)["reason"]: v for k, v in samples(fams, "nitro_net_drops_total").items()}
    assert drops == {"no_rx_buffer": 1, "spoofed_source": 2, "unknown_destination": 0, "bad_header": 0, "mtu": 0,
                     "punt_overflow": 0, "a_new_reason": 7}  # whatever C reports, nothing else
    for name, n in (("bw_in", 3), ("bw_out", 4), ("pps", 5), ("linklocal", 8)):
        assert fams[f"nitro_net_{name}_allowance_exceeded"].type == "counter"
        assert value(fams, f"nitro_net_{name}_allowance_exceeded_total", interface="web") == n
    assert value(fams, "nitro_net_punted_total", interface="web") == 6


def test_scrape_vpcs(serve):
    red = vpc_stats(id="red", counters={"arp_replies": 0}, punt_errors=0)
    del red["uplink"]
    down = vpc_stats(id="green", uplink={**vpc_stats()["uplink"], "name": "nv1", "state": "down", "error": "x"})
    fams = families(scrape(serve(lambda: [], get_vpcs=lambda: {"blue": vpc_stats(), "red": red, "green": down})))
    assert value(fams, "nitro_vpc_control_frames_total", vpc="blue", outcome="arp_replies") == 2
    assert value(fams, "nitro_vpc_control_frames_total", vpc="blue", outcome="unknown") == 0
    assert value(fams, "nitro_vpc_control_frames_total", vpc="red", outcome="arp_replies") == 0
    assert value(fams, "nitro_vpc_punt_errors_total", vpc="blue") == 3
    assert value(fams, "nitro_vpc_punt_errors_total", vpc="red") == 0
    vu = {"vpc": "blue", "uplink": "nv0"}
    assert value(fams, "nitro_vpc_uplink_up", **vu) == 1
    assert value(fams, "nitro_vpc_uplink_up", vpc="green", uplink="nv1") == 0
    assert value(fams, "nitro_vpc_uplink_packets_total", **vu, direction="in") == 4
    assert value(fams, "nitro_vpc_uplink_bytes_total", **vu, direction="out") == 500
    assert value(fams, "nitro_vpc_uplink_drops_total", **vu, reason="mtu") == 1
    assert {dict(k)["vpc"] for k in samples(fams, "nitro_vpc_uplink_up")} == {"blue", "green"}
    assert value(fams, "nitro_metrics_collect_errors_total") == 0


def test_broken_vpc_statistics_are_skipped(serve):
    def broken():
        raise RuntimeError("fabric gone")

    fams = families(scrape(serve(lambda: [FakeDevice(blk_stats())], get_vpcs=broken)))
    assert value(fams, "nitro_vhost_connected", device="vol0", kind="blk") == 1
    assert value(fams, "nitro_metrics_collect_errors_total") == 1

    bad = vpc_stats(id="red", counters="not a dict")
    fams = families(scrape(serve(lambda: [], get_vpcs=lambda: {"blue": vpc_stats(), "red": bad})))
    assert {dict(k)["vpc"] for k in samples(fams, "nitro_vpc_punt_errors_total")} == {"blue"}
    assert value(fams, "nitro_metrics_collect_errors_total") == 1


def fleet_stats(**over):
    """FleetNode.statistics() with an Underlay attached (``datapath``)."""
    drops = {"auth": 2, "replay": 1, "spoofed_source": 3, "wrong_vni": 0}
    peer = {"slot": 0, "underlay": "192.0.2.2", "epoch": 7, "packets_out": 10, "bytes_out": 980,
            "packets_in": 9, "bytes_in": 882, "drops": drops, "sa": None}
    datapath = {"host": "a", "underlay": "192.0.2.1", "encrypt": True, "epoch": 5, "state": "up", "worker": 0,
                "vnis": {"blue": 100}, "remote_interfaces": 1, "peers": {"b": peer},
                "drops": {"tunnel": {"auth": 2, "unknown_spi": 4}, "switch": {"spoofed_source": 3}}}
    stats = {"host": "a", "etcd": "up", "watch_lag_seconds": 0, "revision": 9, "peers": 1, "vpcs": 1,
             "remotes": 1, "disconnects": 0, "reloads": 1, "invalid_records": 0, "callback_errors": 0,
             "rekeys": 0, "tunnel_errors": 1, "sas": [], "datapath": datapath}
    return {**stats, **over}


def test_fleet_datapath_per_peer_and_totals():
    fams = {m.name: m for m in NitroCollector(lambda: [], get_fleet=fleet_stats).collect()}

    def v(name, **labels):
        (s,) = [s for s in fams[name].samples if s.labels == labels and not s.name.endswith("_created")]
        return s.value
    assert v("nitro_fleet_underlay_up", host="a") == 1
    assert v("nitro_fleet_peer_packets", host="a", peer="b", direction="out") == 10
    assert v("nitro_fleet_peer_bytes", host="a", peer="b", direction="in") == 882
    assert v("nitro_fleet_peer_drops", host="a", peer="b", reason="auth") == 2
    assert v("nitro_fleet_peer_drops", host="a", peer="b", reason="spoofed_source") == 3
    assert v("nitro_fleet_underlay_drops", host="a", reason="unknown_spi") == 4  # no peer to name
    assert v("nitro_fleet_datapath_update_errors", host="a") == 1
    # Without an Underlay (no fleet VPC here) none of them is exported.
    fams = {m.name: m for m in NitroCollector(lambda: [], get_fleet=lambda: fleet_stats(datapath=None)).collect()}
    assert not fams["nitro_fleet_peer_packets"].samples and not fams["nitro_fleet_underlay_up"].samples


def test_waiting_remote_volumes_are_a_gauge():
    waiting = [{"id": "r0", "kind": "blk", "error": "down", "waiting_seconds": 1.0, "attempts": 1}]
    fams = {m.name: m for m in NitroCollector(lambda: [], get_waiting=lambda: waiting).collect()}
    assert [(s.labels, s.value) for s in fams["nitro_blk_source_waiting"].samples] == [({"device": "r0"}, 1)]
    fams = {m.name: m for m in NitroCollector(lambda: [], get_waiting=list).collect()}
    assert fams["nitro_blk_source_waiting"].samples == []


def test_fleet_volume_locks_held_by_this_host():
    locks = {"r0": "nbd://10.0.0.5:10809/v0", "r1": "nbd://10.0.0.5:10809/v1"}
    fams = {m.name: m for m in NitroCollector(lambda: [], get_fleet=lambda: fleet_stats(volume_locks=locks)).collect()}
    got = {(s.labels["device"], s.labels["volume"]): s.value for s in fams["nitro_fleet_volume_lock"].samples}
    assert got == {("r0", locks["r0"]): 1, ("r1", locks["r1"]): 1}
    fams = {m.name: m for m in NitroCollector(lambda: [], get_fleet=fleet_stats).collect()}
    assert not fams["nitro_fleet_volume_lock"].samples


def test_every_section_is_read_under_the_devices_lock():
    """The daemon frees devices, the switch and the engine under that lock
    (Daemon.close), and a scrape's thread may outlive the metrics server's
    shutdown: no C counter may be read without it."""
    import threading

    lock = threading.Lock()
    reads: dict[str, bool] = {}

    def held(what, value):
        def get():
            reads[what] = lock.locked()  # an assert here would be caught as a failed section
            return value
        return get

    collector = NitroCollector(held("devices", [FakeDevice(blk_stats())]), held("vpcs", []),
                               devices_lock=lock, get_engine=held("engine", None),
                               get_fleet=held("fleet", None), get_waiting=held("waiting", []))
    names = {m.name for m in collector.collect()}
    assert "nitro_blk_requests" in names
    assert reads == dict.fromkeys(("devices", "vpcs", "engine", "fleet", "waiting"), True)
    assert not lock.locked()
