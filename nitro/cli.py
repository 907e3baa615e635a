"""`nitro` command line: run the daemon, query it, manage volumes.

Errors end in one line on stderr and a non-zero exit: 2 for bad arguments or
configuration, 1 for runtime failures. Following vhost-user.rst's "Backend
program conventions", the daemon never daemonizes itself and answers
--print-capabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from nitro import __version__, config

EXIT_USAGE = 2
EXIT_FAILURE = 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        # vhost-user.rst: a JSON object with the backend's device type.
        print(json.dumps({"type": "block", "features": []}))
        return 0
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nitro", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"nitro {__version__}")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities as JSON and exit")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="serve the configured devices (foreground)")
    run.add_argument("--config", type=Path, help="TOML config (default: the embedded one)")
    run.add_argument("--runtime-dir", type=Path, help="sockets go here (overrides the config)")
    run.add_argument("--state-dir", type=Path, help="relative image paths resolve here")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--check", action="store_true", help="validate the config and exit")
    run.set_defaults(func=_cmd_run)

    st = sub.add_parser("status", help="show devices, connections and counters")
    st.add_argument("--control", type=Path, help="control socket (default: from the config)")
    st.add_argument("--config", type=Path)
    st.add_argument("--runtime-dir", type=Path)
    st.add_argument("--json", action="store_true", help="raw JSON")
    st.set_defaults(func=_cmd_status)

    vol = sub.add_parser("volume", help="create volumes")
    vsub = vol.add_subparsers(metavar="ACTION")
    create = vsub.add_parser("create", help="create a sparse raw volume")
    create.add_argument("path", type=Path)
    create.add_argument("--size", required=True, help="e.g. 10G")
    create.set_defaults(func=_cmd_volume_create)
    return p


def _fail(msg: str, code: int) -> int:
    print(f"nitro: error: {msg}", file=sys.stderr)
    return code


def _load(args) -> config.DaemonConfig:
    return config.load(getattr(args, "config", None),
                       runtime_dir=getattr(args, "runtime_dir", None),
                       state_dir=getattr(args, "state_dir", None))


def _cmd_run(args) -> int:
    from nitro import control, daemon, log
    from nitro.sdnotify import Notifier

    try:
        cfg = _load(args)
    except config.ConfigError as e:
        return _fail(f"config {e}", EXIT_USAGE)
    if args.check:
        print(f"{cfg.source}: ok ({len(cfg.blk)} blk devices)")
        return 0
    log.setup_logging(args.log_level or cfg.log_level)
    d = daemon.Daemon(cfg)
    try:
        d.open_devices()
    except daemon.StartupError as e:
        return _fail(str(e), EXIT_FAILURE)
    try:
        trio.run(d.run, Notifier.from_environment())
    except (OSError, control.ControlError) as e:
        return _fail(f"cannot serve: {e}", EXIT_FAILURE)
    except BaseExceptionGroup as eg:
        # Start-up failures inside the nursery (a socket path in use, ...)
        # arrive wrapped; report the first as one line.
        first = _leaf(eg)
        if isinstance(first, (OSError, control.ControlError)):
            return _fail(f"cannot serve: {first}", EXIT_FAILURE)
        raise
    return 0


def _leaf(eg: BaseExceptionGroup) -> BaseException:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


def _cmd_status(args) -> int:
    from nitro import control

    path = args.control
    if path is None:
        try:
            path = _load(args).control_socket
        except config.ConfigError as e:
            return _fail(f"config {e}", EXIT_USAGE)
    try:
        reply = control.query(path, {"cmd": "status"})
    except control.ControlError as e:
        return _fail(str(e), EXIT_FAILURE)
    print(json.dumps(reply, indent=2) if args.json else control.format_status(reply))
    return 0


def _cmd_volume_create(args) -> int:
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
