"""`nitro vpc create|list|delete`: the fleet's VPCs, defined once in etcd.

Each change is one etcd transaction: create puts ``/nitro/vpcs/<name>``
and ``/nitro/vnis/<vni>`` only if neither exists (a name or VNI is never
taken twice, even by two operators at once); delete removes both only if
the VPC is unchanged since it was read and no key exists under
``/nitro/interfaces/<name>/``. Failures are one line and an exit status
(2: bad arguments, 1: etcd said no or cannot be reached).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from nitro import config
from nitro.fleet import schema
from nitro.fleet.etcd import EtcdClient
from nitro.fleet.etcd_codec import Compare, EtcdError, op_delete, op_put, op_range
from nitro.fleet.schema import RecordError, VpcRecord
from nitro.volume_cli import EXIT_FAILURE, EXIT_USAGE, CliError, _fail

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    vpc = sub.add_parser("vpc", help="create and manage the fleet's VPCs (in etcd)")
    vsub = vpc.add_subparsers(metavar="ACTION")

    create = vsub.add_parser("create", help="define a VPC for the whole fleet")
    create.add_argument("name")
    create.add_argument("--cidr", required=True, help="IPv4 network, e.g. 10.1.0.0/24")
    create.add_argument("--vni", required=True, type=int, help=f"Geneve VNI, 1..{schema.MAX_VNI}, unique")
    create.add_argument("--mtu", type=int, default=1500, help="the guests' MTU (default 1500)")
    create.add_argument("--dns", action="append", default=[], metavar="ADDR",
                        help="DNS server handed out by DHCP (repeat, or comma-separated)")
    create.add_argument("--gateway", help="the VPC router's address (default: the first host address)")
    _etcd_args(create)
    create.set_defaults(func=lambda a: _run(_create, a))

    ls = vsub.add_parser("list", help="the fleet's VPCs and how many interfaces each has")
    ls.add_argument("--json", action="store_true")
    _etcd_args(ls)
    ls.set_defaults(func=lambda a: _run(_list, a))

    rm = vsub.add_parser("delete", help="remove a VPC (refused while interfaces are in it)")
    rm.add_argument("name")
    _etcd_args(rm)
    rm.set_defaults(func=lambda a: _run(_delete, a))


def _etcd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", action="append", default=[], metavar="URL",
                   help="etcd client URL (repeat, or comma-separated; default: [fleet] etcd of --config)")
    p.add_argument("--config", type=Path, help="take the etcd endpoints from this file's [fleet] section")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per etcd request (default 5)")


def _endpoints(args: argparse.Namespace) -> list[str]:
    urls = [u for item in args.etcd for u in item.split(",") if u]
    if urls:
        return [config.check_etcd_url(u, "<command line>", "--etcd") for u in urls]
    if args.config is None:
        raise CliError("give --etcd URL (or --config FILE with a [fleet] section)", EXIT_USAGE)
    cfg = config.load(args.config)
    if cfg.fleet is None:
        raise CliError(f"{args.config}: no [fleet] section: give --etcd URL", EXIT_USAGE)
    return list(cfg.fleet.etcd)


def _run(action, args: argparse.Namespace) -> int:
    try:
        endpoints = _endpoints(args)

        async def main() -> int:
            async with EtcdClient(endpoints, timeout=args.timeout) as etcd:
                return await action(etcd, args)

        return trio.run(main)
    except CliError as e:
        return _fail(str(e), e.code)
    except config.ConfigError as e:
        return _fail(f"config {e}", EXIT_USAGE)
    except EtcdError as e:
        return _fail(str(e), EXIT_FAILURE)


def vpc_from_args(args: argparse.Namespace) -> VpcRecord:
    """The record `create` writes; CliError (usage) naming the bad option."""
    try:
        cidr = schema.check_cidr(args.cidr)
    except RecordError as e:
        raise CliError(f"--cidr {args.cidr}: {e}", EXIT_USAGE) from None
    try:
        gateway = ipaddress.IPv4Address(args.gateway) if args.gateway else next(cidr.hosts())
        dns = tuple(ipaddress.IPv4Address(d) for item in args.dns for d in item.split(",") if d)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if len(dns) > config.MAX_DNS:
        raise CliError(f"--dns: at most {config.MAX_DNS} servers", EXIT_USAGE)
    try:
        return VpcRecord(args.name, cidr, args.vni, gateway, args.mtu, dns)
    except RecordError as e:
        raise CliError(str(e), EXIT_USAGE) from None


async def _create(etcd: EtcdClient, args: argparse.Namespace) -> int:
    vpc = vpc_from_args(args)
    r = await etcd.txn([Compare.missing(vpc.key), Compare.missing(vpc.vni_key)],
                       [op_put(vpc.key, vpc.encode()), op_put(vpc.vni_key, vpc.name.encode())],
                       [op_range(vpc.key), op_range(vpc.vni_key)])
    if not r.succeeded:
        existing, vni_holder = (rr.kvs for rr in r.ranges())
        if existing:
            raise CliError(f"VPC {vpc.name} already exists")
        holder = vni_holder[0].value.decode(errors="replace") if vni_holder else "?"
        raise CliError(f"VNI {vpc.vni} is already used by VPC {holder}")
    print(f"created VPC {vpc.name}: {vpc.cidr} vni {vpc.vni} mtu {vpc.mtu} gateway {vpc.gateway}"
          + (f" dns {','.join(map(str, vpc.dns))}" if vpc.dns else ""))
    return 0


async def _list(etcd: EtcdClient, args: argparse.Namespace) -> int:
    vpcs = await etcd.range(schema.VPCS.encode(), prefix=True)
    ifaces = await etcd.range(schema.INTERFACES.encode(), prefix=True)
    count: Counter[str] = Counter()
    for kv in ifaces.kvs:
        try:
            _, (name, _) = schema.decode_key(kv.key)
            count[name] += 1
        except RecordError:
            pass
    rows: list[dict[str, Any]] = []
    for kv in vpcs.kvs:
        try:
            _, name = schema.decode_key(kv.key)
            v = VpcRecord.decode(name, kv.value)
        except RecordError as e:
            rows.append({"name": kv.key.decode(errors="replace"), "error": str(e)})
            continue
        rows.append({"name": v.name, "cidr": str(v.cidr), "vni": v.vni, "mtu": v.mtu,
                     "gateway": str(v.gateway), "dns": [str(d) for d in v.dns],
                     "interfaces": count[v.name]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<20} {'CIDR':<18} {'VNI':>8} {'MTU':>5} {'GATEWAY':<15} {'IFACES':>6}  DNS")
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<20} unreadable: {row['error']}")
            continue
        print(f"{row['name']:<20} {row['cidr']:<18} {row['vni']:>8} {row['mtu']:>5} {row['gateway']:<15} "
              f"{row['interfaces']:>6}  {','.join(row['dns']) or '-'}")
    return 0


async def _delete(etcd: EtcdClient, args: argparse.Namespace) -> int:
    key = f"{schema.VPCS}{args.name}".encode()
    kv = await etcd.get(key)
    if kv is None:
        raise CliError(f"no VPC {args.name}")
    ops = [op_delete(key)]
    try:
        ops.append(op_delete(VpcRecord.decode(args.name, kv.value).vni_key))
    except RecordError:
        pass  # an unreadable record: remove it; its VNI index (if any) stays
    prefix = schema.interfaces_prefix(args.name)
    r = await etcd.txn([Compare.mod_revision(key, kv.mod_revision), Compare.version(prefix, 0, prefix=True)],
                       ops, [op_range(prefix, prefix=True)])
    if not r.succeeded:
        held = r.ranges()[0].kvs
        if held:
            ips = ", ".join(k.key.decode(errors="replace").rsplit("/", 1)[-1] for k in held[:5])
            more = f" and {len(held) - 5} more" if len(held) > 5 else ""
            raise CliError(f"VPC {args.name} still has {len(held)} interface{'s' if len(held) != 1 else ''} "
                           f"({ips}{more}); detach them first")
        raise CliError(f"VPC {args.name} changed while deleting it; try again")
    print(f"deleted VPC {args.name}")
    return 0
