"""`nitro volume ...`: create and manage volumes (image files) offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from nitro import config

EXIT_USAGE = 2
EXIT_FAILURE = 1


def add_parser(sub) -> None:
    vol = sub.add_parser("volume", help="create and manage volumes")
    vsub = vol.add_subparsers(metavar="ACTION")
    create = vsub.add_parser("create", help="create a volume (sparse raw)")
    create.add_argument("path", type=Path)
    create.add_argument("--size", required=True, help="e.g. 10G")
    create.set_defaults(func=cmd_create)


def _fail(msg: str, code: int) -> int:
    import sys
    print(f"nitro: error: {msg}", file=sys.stderr)
    return code


def cmd_create(args: argparse.Namespace) -> int:
    from nitro.devices.blk.backends.raw import VolumeError, create_sparse

    try:
        size = config.parse_size(args.size, "<command line>", "--size")
    except config.ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    if args.path.exists():
        return _fail(f"{args.path}: already exists; refusing to overwrite", EXIT_FAILURE)
    try:
        create_sparse(args.path, size)
    except VolumeError as e:
        return _fail(str(e), EXIT_FAILURE)
    print(f"created {args.path} ({size} bytes, sparse raw)")
    return 0
