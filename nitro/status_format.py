"""`nitro status`: a status reply rendered as text for people, or as one
JSON document for scripts (``--json``) with the same content.

The daemon sends numbers (feature bits, counters); names are looked up here,
on the CLI's side: each device's config module describes its own feature
bits (``FEATURE_NAMES`` in nitro/devices/blk/config.py and
nitro/devices/net/config.py), nitro/devices/base.py the bits every device
shares, nitro/vhost/protocol.py the vhost-user protocol features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nitro.devices import base
from nitro.devices.blk import config as blk_config
from nitro.devices.net import config as net_config
from nitro.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature

__all__ = ["decode_features", "format_status", "status_document"]

# The bits every device shares, plus vhost-user's bit 30.
_COMMON_FEATURES = {**base.FEATURE_NAMES, VHOST_USER_F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES"}
# Keyed by a device's statistics()["kind"].
_DEVICE_FEATURES = {
    "blk": blk_config.FEATURE_NAMES,
    "net": net_config.FEATURE_NAMES,
}


def _protocol_feature_name(bit: int) -> str | None:
    """vhost-user.rst "Protocol features", minus VHOST_USER_PROTOCOL_F_."""
    return ProtocolFeature(1 << bit).name


def decode_features(bits: int, kind: str | None = None) -> list[str]:
    """Names of the set virtio feature bits, lowest bit first; device-specific
    names for ``kind`` ("blk", "net"), ``bitN`` for bits without a name."""
    table = {**_DEVICE_FEATURES.get(kind or "", {}), **_COMMON_FEATURES}
    return _decode(bits, table.get)


def _decode(bits: int, name_of: Callable[[int], str | None]) -> list[str]:
    names = []
    bit = 0
    while bits >> bit:
        if (bits >> bit) & 1:
            names.append(name_of(bit) or f"bit{bit}")
        bit += 1
    return names


def _yn(value: Any) -> str:
    return "yes" if value else "no"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "    ") -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        first, *rest = r
        lines.append(indent + "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])]))
    return lines


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _describe(d: dict) -> dict:
    """What the text shows of a device beyond its raw fields: the state and
    the names of its feature bits, the mean latency. Raises on fields of an
    unexpected type."""
    if d.get("broken"):
        state = "broken"
    else:
        state = "connected" if d.get("connected") else "waiting"
    features = int(d.get("features", 0) or 0)
    pfeatures = int(d.get("protocol_features", 0) or 0)
    described: dict[str, Any] = {
        "state": state,
        "feature_names": decode_features(features, d.get("kind")),
        "protocol_feature_names": _decode(pfeatures, _protocol_feature_name),
    }
    if "latency_buckets" in d:
        count = sum(n for _, n in d["latency_buckets"] or [])
        described["latency_requests"] = count
        described["latency_mean_us"] = (float(d.get("latency_sum_seconds", 0.0)) / count * 1e6) if count else None
    return described


def _format_qos(q: dict) -> str:
    """A volume's QoS limits and where it stands (docs/volumes.md "QoS")."""
    if not (q.get("iops") or q.get("throughput")):
        return "unlimited"
    limits = [f"{q['iops']} IOPS" if q.get("iops") else "", f"{q['throughput']} B/s" if q.get("throughput") else ""]
    text = ", ".join(x for x in limits if x)
    if q.get("burst_iops"):
        text += (f", burst {q['burst_iops']} IOPS for {q.get('burst_seconds', 0)} s "
                 f"(credits {q.get('credits', 0)}/{q.get('credits_max', 0)})")
    return (f"{text}; exceeded iops {q.get('exceeded_iops_ns', 0) / 1e9:.1f} s, "
            f"throughput {q.get('exceeded_throughput_ns', 0) / 1e9:.1f} s; delayed {q.get('delayed', 0)}, "
            f"queued {q.get('queued', 0)}")


#: blk backends whose storage is reached over the network (docs/volumes.md).
REMOTE_BACKENDS = ("nbd", "rbd")


def _format_volume(d: dict) -> str:
    """`/srv/vm/db0.img (file; through its mapping: 1200 reads, 800 writes)`,
    `nbd://host/export (nbd, LUKS2: 512-byte sectors, vaes512 XTS)`. An
    image file's reads and writes of pages in the page cache go through
    nitro's mapping of it (docs/volumes.md "Reads and writes through the
    page cache"); an encrypted volume's XTS path is the one nitro picked
    on this CPU (docs/encryption.md "The datapath")."""
    extra = ", LUKS2" if d.get("encrypted") else ""
    cipher = d.get("cipher")
    if isinstance(cipher, dict):
        extra += f": {cipher.get('sector_size')}-byte sectors, {cipher.get('impl')} XTS"
    writable = not d.get("readonly")
    if d.get("mapped"):
        extra += f"; through its mapping: {d.get('mapped_reads', 0)} reads"
        if d.get("mapped_writable"):
            extra += f", {d.get('mapped_writes', 0)} writes"
        elif writable:
            extra += "; mapped read-only: every write by pwrite"
    elif d.get("backend") == "file":
        extra += "; not mapped: every read through io_uring"
        if writable:
            extra += ", every write by pwrite"
    return f"{d['volume']} ({d.get('backend', '?')}{extra})"


def _format_remote(d: dict) -> str:
    """A remote volume's link to its storage: NBD's connections (one per
    queue) and what they went through; for any source, the requests
    that got an I/O error at io_timeout."""
    r = d.get("remote")
    text = ""
    if isinstance(r, dict):
        text = (f"connections {r.get('connected', 0)}/{r.get('connections', '?')} up; "
                f"connects {r.get('connects', 0)}, "
                f"disconnects {r.get('disconnects', 0)}, resent {r.get('resent', 0)}; ")
    return text + f"timed out {d.get('timeouts', 0)}"


def _format_device(d: dict) -> list[str]:
    if "error" in d:
        return [f"{d.get('id', '?')}: {d['error']}"]
    kind = d.get("kind", "?")
    x = _describe(d)
    lines = [f"{d.get('id', '?')}  ({kind})  {d.get('socket', '')}"]
    state = {"broken": f"BROKEN ({d.get('broken')})", "waiting": "waiting for frontend"}.get(x["state"], x["state"])
    lines.append(f"  state:       {state}; connections {d.get('connections', 0)}, "
                 f"protocol errors {d.get('protocol_errors', 0)}")
    features = int(d.get("features", 0) or 0)
    lines.append(f"  features:    {features:#x} {' '.join(x['feature_names'])}".rstrip())
    pfeatures = int(d.get("protocol_features", 0) or 0)
    lines.append(f"  protocol:    {pfeatures:#x} {' '.join(x['protocol_feature_names'])}".rstrip())
    if "capacity_bytes" in d:
        mode = "read-only" if d.get("readonly") else "read-write"
        lines.append(f"  capacity:    {d['capacity_bytes']} bytes ({_human_bytes(d['capacity_bytes'])}), {mode}")
    if "volume" in d:
        lines.append(f"  volume:      {_format_volume(d)}")
    if d.get("backend") in REMOTE_BACKENDS:
        lines.append(f"  remote:      {_format_remote(d)}")
    if "inflight" in d:
        resubmitted = d.get("resubmitted")
        extra = f" (resubmitted after restarts: {resubmitted})" if resubmitted else ""
        lines.append(f"  inflight:    {d['inflight']}{extra}")
    if x.get("latency_requests"):
        lines.append(f"  latency:     mean {x['latency_mean_us']:.1f} us over {x['latency_requests']} requests")
    qos = d.get("qos")
    if isinstance(qos, dict):
        lines.append(f"  qos:         {_format_qos(qos)}")
    queues = d.get("queues") or []
    if queues:
        lines.append("  queues:")
        rows = []
        for q in queues:
            faults = q.get("faults") or {}
            nonzero = ",".join(f"{k}={v}" for k, v in faults.items() if v) or "0"
            worker = q.get("worker")
            rows.append([q.get("index", "?"), _yn(q.get("enabled")), _yn(q.get("running")),
                         "-" if worker is None else worker,
                         q.get("kicks", 0), q.get("calls", 0), q.get("chains", 0), nonzero])
        lines += _table(["queue", "enabled", "running", "worker", "kicks", "calls", "chains", "faults"], rows)
    net = d.get("net")
    if isinstance(net, dict):
        lines += _format_net(d, net)
    ops = d.get("ops") or {}
    if ops:
        lines.append("  ops:")
        rows = [[op, c.get("requests", 0), c.get("bytes", 0), c.get("errors", 0)] for op, c in ops.items()]
        lines += _table(["op", "requests", "bytes", "errors"], rows)
    return lines


def _format_net(d: dict, net: dict) -> list[str]:
    lines = [f"  interface:   mac {d.get('mac', '?')}  ip {d.get('ip', '?')}  vpc {d.get('vpc', '?')}"]
    lease = d.get("lease")
    if lease:
        lines.append(f"  lease:       {lease.get('state')} (expires in {lease.get('expires_in')} s)")
    lines += _table(["direction", "packets", "bytes"],
                    [["in", net.get("packets_in", 0), net.get("bytes_in", 0)],
                     ["out", net.get("packets_out", 0), net.get("bytes_out", 0)]])
    drops = net.get("drops") or {}
    lines.append("  drops:       " + (" ".join(f"{k}={v}" for k, v in drops.items()) or "0"))
    lines.append(f"  allowance:   bw_in_allowance_exceeded={net.get('bw_in_allowance_exceeded', 0)} "
                 f"bw_out_allowance_exceeded={net.get('bw_out_allowance_exceeded', 0)} "
                 f"pps_allowance_exceeded={net.get('pps_allowance_exceeded', 0)} "
                 f"linklocal_allowance_exceeded={net.get('linklocal_allowance_exceeded', 0)}")
    return lines


def _format_vpcs(vpcs: dict) -> list[str]:
    lines = []
    for vpc_id, v in vpcs.items():
        if not isinstance(v, dict) or "counters" not in v:
            lines.append(f"vpc {vpc_id}: {v}")
            continue
        counters = {**v["counters"], "punt_errors": v.get("punt_errors", 0)}
        c = " ".join(f"{k}={n}" for k, n in counters.items() if n)
        lines.append(f"vpc {vpc_id}: {c or 'no control traffic yet'}")
        up = v.get("uplink")
        if up:
            state = up.get("state", "up")
            if up.get("error"):
                state = f"{state.upper()} ({up['error']})"
            lines.append(f"  uplink {up.get('name')}: {state}; in {up.get('packets_in', 0)} pkts "
                         f"{up.get('bytes_in', 0)} B, out {up.get('packets_out', 0)} pkts "
                         f"{up.get('bytes_out', 0)} B")
    return lines


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _format_engine(engine: dict) -> list[str]:
    workers = engine.get("workers") or []
    poll = engine.get("poll_us")
    lines = [f"engine: {len(workers)} worker{'s' if len(workers) != 1 else ''}, "
             f"blk I/O {engine.get('blk_io', '?')}, busy-poll "
             f"{poll if poll == 'adaptive' else f'{poll} us'}"
             f"{', seccomp' if engine.get('seccomp') else ''}"]
    if "guest_memory_bytes" in engine:
        cap = engine.get("max_guest_memory")
        lines.append(f"guest memory mapped: {_mib(engine['guest_memory_bytes'])}"
                     f"{f' of max_guest_memory {_mib(cap)}' if cap else ' (no cap)'}")
    rows = [[w.get("id", "?"), "-" if w.get("cpu") is None else w["cpu"], w.get("rings", 0), w.get("draining", 0),
             w.get("chains", 0),
             f"{w.get('busy_ns', 0) / 1e9:.2f}", f"{w.get('poll_ns', 0) / 1e9:.2f}",
             f"{w.get('sleep_ns', 0) / 1e9:.2f}", w.get("wakeups", 0), w.get("poll_us", 0)] for w in workers]
    # draining: rings detached but still finishing a remote volume's requests
    # (an outage holds one up to io_timeout; docs/volumes.md).
    lines += _table(["worker", "cpu", "rings", "draining", "chains", "busy s", "poll s", "sleep s", "wakeups",
                     "window us"],
                    rows, indent="  ")
    return lines


def _format_fleet(f: dict) -> list[str]:
    etcd = f.get("etcd", "?")
    lag = f.get("watch_lag_seconds", 0)
    if etcd == "up":
        link = f"etcd up via {f.get('endpoint', '?')}"
    else:
        link = (f"etcd {etcd.upper()} for {lag:.1f} s, keeping the last known state "
                f"(last error: {f.get('last_error') or '-'})")
    lines = [f"fleet: host {f.get('host', '?')} (underlay {f.get('underlay', '?')}), {link}",
             f"  watch:       revision {f.get('revision', 0)}, lag {lag:.1f} s, "
             f"disconnects {f.get('disconnects', 0)}, reloads {f.get('reloads', 0)}",
             f"  state:       {f.get('peers', 0)} peer hosts, {f.get('vpcs', 0)} VPCs, "
             f"{f.get('interfaces', 0)} interfaces ({f.get('remotes', 0)} remote)"]
    if f.get("invalid_records"):
        lines.append(f"  invalid:     {f['invalid_records']} records skipped; last: {f.get('last_invalid')}")
    for key, holder in (f.get("conflicts") or {}).items():
        lost = "this host's lock was lost: both may write the volume" if key.startswith("/nitro/volumes/") \
            else "not published"
        lines.append(f"  conflict:    {key} is held by host {holder}; {lost}")
    for device, volume in (f.get("volume_locks") or {}).items():
        lines.append(f"  volume lock: {volume} (device {device})")
    if "index" in f:
        lines += _format_fleet_keys(f)
    return lines


def _sa_text(sa: dict | None) -> str:
    if not sa:
        return "none"
    return f"epoch {sa.get('epoch')} (age {sa.get('age_ns', 0) / 1e9:.1f} s, {sa.get('packets', 0)} packets)"


def _format_fleet_keys(f: dict) -> list[str]:
    """This host's index and epoch, then one line per peer's SAs."""
    published = f.get("published_epoch")
    if not f.get("encrypt", True):
        keyline = "encryption OFF ([fleet] encrypt = false)"
    else:
        keyline = (f"epoch {f.get('epoch')} ({'published' if published == f.get('epoch') else 'NOT yet in etcd'}, "
                   f"age {f.get('epoch_age_seconds', 0):.1f} s, rekey every {f.get('rekey_interval')} s), "
                   f"{f.get('rekeys', 0)} rekeys" + (f", last: {f['last_rekey_reason']}"
                                                      if f.get("last_rekey_reason") else ""))
    lines = [f"  keys:        index {f.get('index')}, {keyline}"]
    if f.get("tunnel_errors"):
        lines.append(f"  tunnel:      {f['tunnel_errors']} peer/VNI updates failed")
    for sa in f.get("sas") or []:
        lines.append(f"  sa {sa.get('peer')}: index {sa.get('index')}, publishes epoch {sa.get('peer_epoch')}; "
                     f"out {_sa_text(sa.get('out'))}; in {_sa_text(sa.get('in'))}")
    if isinstance(f.get("datapath"), dict):
        lines += _format_underlay(f["datapath"])
    return lines


def _drops_text(drops: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items()) if n) or "none"


def _format_underlay(u: dict) -> list[str]:
    """The Underlay: its address and ring, then per peer host its counters."""
    state = u.get("state", "?")
    ring = f"ring on worker {u['worker']}" if u.get("worker") is not None else "ring not attached"
    vnis = ", ".join(f"{vpc} vni {vni}" for vpc, vni in sorted((u.get("vnis") or {}).items())) or "no VNI"
    lines = [f"  underlay:    {u.get('underlay')} {state}, {ring}"
             + (f" ({u['error']})" if u.get("error") else "")
             + f"; {vnis}; {u.get('remote_interfaces', 0)} remote interfaces"]
    for host, p in sorted((u.get("peers") or {}).items()):
        lines.append(f"  peer {host} ({p.get('underlay')}): out {p.get('packets_out', 0)} frames "
                     f"{p.get('bytes_out', 0)} B, in {p.get('packets_in', 0)} frames {p.get('bytes_in', 0)} B; "
                     f"drops: {_drops_text(p.get('drops') or {})}")
    return lines


def _format_waiting(w: dict) -> list[str]:
    """A remote volume whose source was unreachable: no socket yet."""
    return [f"{w['id']}  {w['kind']}  WAITING for its remote source "
            f"({w['waiting_seconds']:g} s, {w['attempts']} attempts; no socket yet)",
            f"  last error: {w['error']}"]


def format_status(reply: dict) -> str:
    """A ``status`` reply -> the human-readable text of ``nitro status``:
    one block per device (id, kind, socket, state, features as hex and by
    name, capacity, per-queue counters, per-op counters)."""
    if not reply.get("ok"):
        return f"error: {reply.get('error', 'unknown error')}"
    devices = reply.get("devices") or []
    waiting = reply.get("waiting") or []
    lines = [f"nitro {reply.get('version', '?')}: {len(devices)} device{'s' if len(devices) != 1 else ''}"
             + (f", {len(waiting)} waiting for a remote source" if waiting else "")]
    for d in devices:
        lines.append("")
        try:
            lines += _format_device(d)
        except Exception as exc:  # a field of an unexpected type: show the rest
            lines.append(f"{d.get('id', '?') if isinstance(d, dict) else '?'}: cannot display: {exc}")
    for w in waiting:
        lines.append("")
        try:
            lines += _format_waiting(w)
        except Exception as exc:
            lines.append(f"waiting device: cannot display: {exc}")
    engine = reply.get("engine")
    if isinstance(engine, dict):
        lines.append("")
        try:
            lines += _format_engine(engine)
        except Exception as exc:
            lines.append(f"engine: cannot display: {exc}")
    vpcs = reply.get("vpcs")
    if isinstance(vpcs, dict) and vpcs:
        lines.append("")
        try:
            lines += _format_vpcs(vpcs)
        except Exception as exc:
            lines.append(f"vpcs: cannot display: {exc}")
    fleet = reply.get("fleet")
    if isinstance(fleet, dict):
        lines.append("")
        try:
            lines += _format_fleet(fleet) if "error" not in fleet else [f"fleet: {fleet['error']}"]
        except Exception as exc:
            lines.append(f"fleet: cannot display: {exc}")
    return "\n".join(lines)


def status_document(reply: dict) -> dict:
    """A ``status`` reply -> what ``nitro status --json`` prints: the reply
    as the daemon sent it (raw numbers: feature bits, counters), each
    device with what the text adds: ``state`` ("connected", "waiting" for a
    frontend, "broken"), ``feature_names``, ``protocol_feature_names`` and,
    for devices with a latency histogram, ``latency_requests`` and
    ``latency_mean_us`` (null before the first request). A device whose
    fields cannot be read gets ``display_error`` instead, as the text shows
    "cannot display"; an entry with ``error`` (its statistics() failed) is
    kept as it is."""
    if not reply.get("ok"):
        return reply
    devices = []
    for d in reply.get("devices") or []:
        if not isinstance(d, dict) or "error" in d:
            devices.append(d)
            continue
        try:
            devices.append({**d, **_describe(d)})
        except Exception as exc:
            devices.append({**d, "display_error": str(exc)})
    return {**reply, "devices": devices}
