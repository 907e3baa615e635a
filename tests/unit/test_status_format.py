"""`nitro status` for people: status replies (as they arrive over the wire)
rendered as text, and feature bits by name from each device's module."""

import json

from nitro.control.protocol import encode_reply
from nitro.status_format import decode_features, format_status, status_document
from tests.unit.status_samples import ENGINE, VPCS, blk_stats


def wire(reply: dict) -> dict:
    """A reply as the CLI receives it (tuples as lists, +Inf as a string)."""
    return json.loads(encode_reply(reply))


def status(*devices: dict, **sections) -> dict:
    return wire({"ok": True, "version": "9.9.9", "devices": list(devices), **sections})


def test_format_vpcs_shows_uplink_state_and_punt_errors():
    text = format_status(status(vpcs=VPCS))
    assert "vpc blue: arp_replies=2 dhcp_acks=1 punt_errors=3" in text
    assert "uplink nv0: DOWN (HostError: poll failed); in 4 pkts 400 B, out 5 pkts 500 B" in text
    assert "vpc red: no control traffic yet" in text
    up = {**VPCS["blue"]["uplink"], "state": "up"}
    del up["error"]
    text = format_status({"ok": True, "devices": [], "vpcs": {"blue": {**VPCS["blue"], "uplink": up}}})
    assert "uplink nv0: up; in 4 pkts" in text


def test_decode_features():
    assert decode_features(0x130000044, "blk") == [
        "SEG_MAX", "BLK_SIZE", "RING_INDIRECT_DESC", "RING_EVENT_IDX", "VERSION_1"]
    assert decode_features((1 << 5) | (1 << 9) | (1 << 14) | (1 << 45), "blk") == ["RO", "FLUSH", "WRITE_ZEROES", "bit45"]
    assert decode_features(1 << 5, "net") == ["MAC"]
    assert decode_features(1 << 5, None) == ["bit5"]
    assert decode_features(0, "blk") == []


def test_feature_names_come_from_the_device_modules():
    from nitro.devices.blk import config as blkcfg
    from nitro.devices.net import config as netcfg

    assert decode_features(netcfg.device_features(), "net") == [
        "CSUM", "GUEST_CSUM", "MTU", "MAC", "GUEST_TSO4", "GUEST_TSO6", "HOST_TSO4", "HOST_TSO6",
        "MRG_RXBUF", "STATUS", "CTRL_VQ", "MQ",
        "RING_INDIRECT_DESC", "RING_EVENT_IDX", "VERSION_1", "RING_PACKED"]
    assert decode_features(1 << netcfg.VIRTIO_NET_F_HOST_TSO4, "net") == ["HOST_TSO4"]
    assert decode_features(1 << blkcfg.VIRTIO_BLK_F_DISCARD | 1 << 11, "blk") == ["CONFIG_WCE", "DISCARD"]
    assert decode_features(1 << 30 | 1 << 34) == ["PROTOCOL_FEATURES", "RING_PACKED"]


def test_every_feature_constant_has_its_spec_name():
    """A bit added to a device module without a FEATURE_NAMES entry would
    show as bitN; the table's name is the constant's, minus its prefix."""
    from nitro.devices import base
    from nitro.devices.blk import config as blkcfg
    from nitro.devices.net import config as netcfg

    for module, prefix, names in ((blkcfg, "VIRTIO_BLK_F_", blkcfg.FEATURE_NAMES),
                                  (netcfg, "VIRTIO_NET_F_", netcfg.FEATURE_NAMES),
                                  (base, "VIRTIO_F_", base.FEATURE_NAMES),
                                  (base, "VIRTIO_RING_F_", {b: n.removeprefix("RING_")
                                                            for b, n in base.FEATURE_NAMES.items()})):
        constants = {name: bit for name, bit in vars(module).items() if name.startswith(prefix)}
        assert constants, prefix
        for name, bit in constants.items():
            assert names.get(bit) == name.removeprefix(prefix), (name, bit)


def test_protocol_feature_names():
    from nitro.vhost.protocol import ProtocolFeature

    pf = int(ProtocolFeature.MQ | ProtocolFeature.CONFIGURE_MEM_SLOTS) | 1 << 40
    text = format_status({"ok": True, "devices": [blk_stats(protocol_features=pf)]})
    assert f"protocol:    {pf:#x} MQ CONFIGURE_MEM_SLOTS bit40" in text


def test_format_status():
    text = format_status(status(
        blk_stats("vol0"),
        blk_stats("vol1", connected=False, broken="desc_loop", readonly=True,
                  features=(1 << 32) | (1 << 5) | (1 << 9) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14)
                  | (1 << 1) | (1 << 10)),
        {"id": "bad", "error": "statistics() failed: ValueError: nope"},
    ))
    print(text)
    assert text.splitlines()[0] == "nitro 9.9.9: 3 devices"
    assert "vol0  (blk)  /run/nitro/vol0.sock" in text
    assert "0x130000044 SEG_MAX BLK_SIZE RING_INDIRECT_DESC RING_EVENT_IDX VERSION_1" in text
    for name in ("SIZE_MAX", "RO", "FLUSH", "TOPOLOGY", "CONFIG_WCE", "MQ", "DISCARD", "WRITE_ZEROES"):
        assert f" {name}" in text
    assert "0x208 REPLY_ACK CONFIG" in text  # protocol features
    assert "state:       connected" in text
    assert "BROKEN (desc_loop)" in text
    assert "read-only" in text and "1.0 GiB" in text
    assert "mean 50.0 us over 10 requests" in text
    assert "desc_loop=1" in text
    # per-queue and per-op tables
    assert any(line.split()[:8] == ["0", "yes", "yes", "1", "11", "10", "12", "desc_loop=1"]
               for line in text.splitlines())
    assert any(line.split() == ["out", "2", "8192", "1"] for line in text.splitlines())
    assert "bad: statistics() failed: ValueError: nope" in text


def test_format_status_shows_the_engine():
    text = format_status({**status(blk_stats("vol0")), "engine": ENGINE})
    assert "engine: 2 workers, blk I/O io_uring, busy-poll adaptive" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["worker", "cpu", "rings", "draining", "chains"] == rows[rows.index(["engine:", "2", "workers,", "blk",
                                                                               "I/O", "io_uring,", "busy-poll",
                                                                               "adaptive"]) + 1][:5]
    assert ["0", "-", "1", "1", "40", "1.50", "0.25", "9.00", "3", "80"] in rows
    assert ["1", "-", "0", "0", "0", "0.00", "0.00", "10.00", "1", "0"] in rows


def test_format_status_shows_waiting_remote_volumes():
    waiting = [{"id": "r0", "kind": "blk", "error": "nbd://h:1/: cannot connect: Connection refused",
                "waiting_seconds": 12.5, "attempts": 4}]
    text = format_status({**status(blk_stats("vol0")), "waiting": waiting})
    assert text.splitlines()[0].endswith("1 device, 1 waiting for a remote source")
    assert "r0  blk  WAITING for its remote source (12.5 s, 4 attempts; no socket yet)" in text
    assert "  last error: nbd://h:1/: cannot connect: Connection refused" in text


def test_format_status_error_and_empty():
    assert format_status({"ok": False, "error": "unknown command 'x'"}) == "error: unknown command 'x'"
    assert format_status({"ok": True, "version": "1", "devices": []}) == "nitro 1: 0 devices"
    # Unexpected field types do not crash the CLI.
    assert "cannot display" in format_status({"ok": True, "version": "1", "devices": [{"id": "x", "features": "?"}]})


# -- `nitro status --json` -------------------------------------------------------

def text_of(text: str, device: str, field: str) -> str | None:
    """The value of one `  field:` line in a device's block of the text
    (None: the block has no such line)."""
    block = text.split(f"\n{device}  (", 1)[1].split("\n\n", 1)[0]
    return next((line.split(":", 1)[1].strip() for line in block.splitlines()
                 if line.strip().startswith(field + ":")), None)


def test_status_document_has_what_the_text_shows():
    reply = status(blk_stats("vol0"),
                   blk_stats("vol1", connected=False, broken="desc_loop", latency_buckets=[]),
                   blk_stats("vol2", connected=False),
                   vpcs=VPCS)
    doc = status_document(reply)
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # strict JSON
    text = format_status(reply)
    assert [d["id"] for d in doc["devices"]] == ["vol0", "vol1", "vol2"]
    vol0, vol1, vol2 = doc["devices"]
    assert {k: vol0[k] for k in reply["devices"][0]} == reply["devices"][0]  # raw fields as sent
    assert vol0["state"] == "connected" and vol1["state"] == "broken" and vol2["state"] == "waiting"
    assert vol0["feature_names"] == ["SEG_MAX", "BLK_SIZE", "RING_INDIRECT_DESC", "RING_EVENT_IDX", "VERSION_1"]
    assert text_of(text, "vol0", "features") == f"{vol0['features']:#x} " + " ".join(vol0["feature_names"])
    assert vol0["protocol_feature_names"] == ["REPLY_ACK", "CONFIG"]
    assert text_of(text, "vol0", "protocol") == "0x208 REPLY_ACK CONFIG"
    assert (vol0["latency_requests"], vol0["latency_mean_us"]) == (10, 50.0)
    assert text_of(text, "vol0", "latency") == "mean 50.0 us over 10 requests"
    assert (vol1["latency_requests"], vol1["latency_mean_us"]) == (0, None)
    assert doc["vpcs"] == VPCS and doc["version"] == "9.9.9"


def test_status_document_net_device_and_odd_entries():
    net = {"id": "eth0", "kind": "net", "connected": True, "features": 1 << 5 | 1 << 32,
           "protocol_features": 0, "net": {"packets_in": 1}}
    failed = {"id": "bad", "error": "statistics() failed: ValueError: nope"}
    odd = {"id": "x", "features": "?"}
    doc = status_document(status(net, failed, odd))
    eth0, bad, x = doc["devices"]
    assert eth0["feature_names"] == ["MAC", "VERSION_1"] and "latency_requests" not in eth0
    assert bad == failed  # as the daemon sent it
    assert x["features"] == "?" and "invalid literal" in x["display_error"]
    refused = {"ok": False, "error": "command 'status' failed: RuntimeError: x"}
    assert status_document(refused) == refused


def test_cli_prints_one_document_and_exits_1_on_an_error_reply(monkeypatch, capsys):
    from nitro import cli
    from nitro.control import client

    replies = [status(blk_stats("vol0")), {"ok": False, "error": "command 'status' failed: X"}]
    monkeypatch.setattr(client, "query", lambda path, request, **kw: replies.pop(0))
    assert cli.main(["status", "--json", "--control", "/nonexistent"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["devices"][0]["id"] == "vol0" and doc["devices"][0]["state"] == "connected"
    assert cli.main(["status", "--json", "--control", "/nonexistent"]) == 1
    assert json.loads(capsys.readouterr().out) == {"ok": False, "error": "command 'status' failed: X"}


def test_format_status_shows_qos():
    limited = {"iops": 2000, "throughput": 100_000_000, "burst_iops": 3000, "burst_seconds": 60,
               "exceeded_iops_ns": 2_500_000_000, "exceeded_throughput_ns": 0, "credits": 41000,
               "credits_max": 60000, "queued": 3, "delayed": 77}
    unlimited = dict.fromkeys(limited, 0)
    text = format_status(status(blk_stats("vol0", qos=limited), blk_stats("vol1", qos=unlimited)))
    assert ("  qos:         2000 IOPS, 100000000 B/s, burst 3000 IOPS for 60 s (credits 41000/60000); "
            "exceeded iops 2.5 s, throughput 0.0 s; delayed 77, queued 3") in text.splitlines()
    assert "  qos:         unlimited" in text.splitlines()


def test_format_status_shows_the_volume_and_its_remote_link():
    remote = {"connections": 2, "connected": 1, "connects": 3, "disconnects": 2, "resent": 5, "timeouts": 4}
    text = format_status(status(
        blk_stats("vol0", volume="/srv/vm/vol0.img", backend="file", encrypted=False, timeouts=0,
                  mapped=True, mapped_writable=True, mapped_reads=1200, mapped_writes=800),
        blk_stats("vol1", volume="nbd://10.0.0.5:10809/vol1", backend="nbd", encrypted=True, timeouts=4,
                  cipher={"sector_size": 4096, "impl": "vaes512"}, remote=remote, mapped=False),
        blk_stats("vol2", volume="rbd:volumes/vm-2", backend="rbd", encrypted=False, timeouts=1),
        blk_stats("vol3", volume="/srv/vm/vol3.img", backend="file", encrypted=True, mapped=False,
                  cipher={"sector_size": 512, "impl": "evp-iv"}),
        blk_stats("vol4", volume="/srv/vm/vol4.img", backend="file", encrypted=False, mapped=True,
                  mapped_writable=False, mapped_reads=7),
        blk_stats("vol5", volume="/srv/vm/base.img", backend="file", encrypted=False, mapped=True,
                  mapped_writable=False, mapped_reads=9, readonly=True)))
    assert text_of(text, "vol0", "volume") == ("/srv/vm/vol0.img (file; through its mapping: "
                                               "1200 reads, 800 writes)")
    assert text_of(text, "vol3", "volume") == ("/srv/vm/vol3.img (file, LUKS2: 512-byte sectors, evp-iv XTS; "
                                               "not mapped: "
                                               "every read through io_uring, every write by pwrite)")
    assert text_of(text, "vol4", "volume") == ("/srv/vm/vol4.img (file; through its mapping: 7 reads; "
                                               "mapped read-only: every write by pwrite)")
    assert text_of(text, "vol5", "volume") == "/srv/vm/base.img (file; through its mapping: 9 reads)"
    assert text_of(text, "vol0", "remote") is None
    assert text_of(text, "vol1", "volume") == ("nbd://10.0.0.5:10809/vol1 (nbd, LUKS2: 4096-byte sectors, "
                                               "vaes512 XTS)")
    assert text_of(text, "vol1", "remote") == ("connections 1/2 up; connects 3, disconnects 2, resent 5; "
                                               "timed out 4")
    assert text_of(text, "vol2", "remote") == "timed out 1"  # librbd reconnects out of sight


def test_format_fleet_keys_one_line_per_peer():
    sa_out = {"spi": 0x105, "epoch": 1_800_000_005, "seq": 9, "packets": 9, "age_ns": 12_300_000_000, "rekey": 0}
    fleet = {"host": "a", "underlay": "192.0.2.1", "etcd": "down", "watch_lag_seconds": 2.0, "index": 1,
             "epoch": 1_800_000_005, "published_epoch": 1_800_000_004, "encrypt": True, "rekeys": 1,
             "rekey_interval": 3600, "last_rekey_reason": "manual", "epoch_age_seconds": 12.3,
             "sas": [{"peer": "b", "index": 2, "peer_epoch": 7, "inbound_epochs": [6, 7, 8], "out": sa_out,
                      "in": None}]}
    text = format_status(status(fleet=fleet))
    assert ("  keys:        index 1, epoch 1800000005 (NOT yet in etcd, age 12.3 s, rekey every 3600 s), "
            "1 rekeys, last: manual") in text
    assert "  sa b: index 2, publishes epoch 7; out epoch 1800000005 (age 12.3 s, 9 packets); in none" in text
    plain = format_status(status(fleet={**fleet, "encrypt": False, "sas": []}))
    assert "index 1, encryption OFF ([fleet] encrypt = false)" in plain


def test_format_fleet_underlay_and_its_peers():
    datapath = {"underlay": "192.0.2.1", "state": "up", "worker": 1, "vnis": {"blue": 100}, "remote_interfaces": 2,
                "peers": {"b": {"underlay": "192.0.2.2", "packets_out": 5, "bytes_out": 490, "packets_in": 4,
                                "bytes_in": 392, "drops": {"auth": 1, "replay": 0, "spoofed_source": 2}}}}
    fleet = {"host": "a", "underlay": "192.0.2.1", "etcd": "up", "index": 1, "epoch": 9, "published_epoch": 9,
             "encrypt": True, "sas": [], "datapath": datapath}
    lines = format_status(status(fleet=fleet)).splitlines()
    assert "  underlay:    192.0.2.1 up, ring on worker 1; blue vni 100; 2 remote interfaces" in lines
    assert ("  peer b (192.0.2.2): out 5 frames 490 B, in 4 frames 392 B; drops: auth 1, spoofed_source 2"
            in lines)


def test_format_fleet_volume_locks_and_a_lost_one():
    fleet = {"host": "a", "underlay": "192.0.2.1", "etcd": "up",
             "volume_locks": {"r0": "nbd://10.0.0.5:10809/v0", "r1": "nbd://10.0.0.5:10809/v1"},
             "conflicts": {"/nitro/volumes/nbd%3A%2F%2F10.0.0.5%3A10809%2Fv1": "b",
                           "/nitro/interfaces/blue/10.1.0.5": "c"}}
    lines = format_status(status(fleet=fleet)).splitlines()
    assert "  volume lock: nbd://10.0.0.5:10809/v0 (device r0)" in lines
    assert ("  conflict:    /nitro/volumes/nbd%3A%2F%2F10.0.0.5%3A10809%2Fv1 is held by host b; "
            "this host's lock was lost: both may write the volume") in lines
    assert "  conflict:    /nitro/interfaces/blue/10.1.0.5 is held by host c; not published" in lines
