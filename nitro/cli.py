"""`nitro` command line: run the daemon, query and reload it, manage volumes and the fleet's VPCs.

Errors end in one line on stderr and a non-zero exit: 2 for bad arguments or
configuration, 1 for runtime failures. Following vhost-user.rst's "Backend
program conventions", the daemon never daemonizes itself and answers
--print-capabilities (for the config: see capabilities()).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from nitro import __version__, config, volume_cli
from nitro.fleet import vpc_cli
from nitro.volume_cli import EXIT_FAILURE, EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        return _print_capabilities(args)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nitro", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"nitro {__version__}")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities of the config as JSON and exit")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="serve the configured devices (foreground)")
    run.add_argument("--config", type=Path, help="TOML config (default: the embedded one)")
    run.add_argument("--runtime-dir", type=Path, help="sockets go here (overrides the config)")
    run.add_argument("--state-dir", type=Path, help="relative image paths resolve here")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--check", action="store_true", help="validate the config and exit")
    # SUPPRESS: unset, it must not hide the top-level flag (`nitro --print-capabilities run`).
    run.add_argument("--print-capabilities", action="store_true", default=argparse.SUPPRESS,
                     help="print the vhost-user backend capabilities of this config as JSON and exit")
    run.set_defaults(func=_cmd_run)

    st = sub.add_parser("status", help="show devices, connections and counters")
    st.add_argument("--control", type=Path, help="control socket (default: from the config)")
    st.add_argument("--config", type=Path)
    st.add_argument("--runtime-dir", type=Path)
    st.add_argument("--json", action="store_true",
                    help="the same content as one JSON document (raw counters and feature bits, plus their names)")
    st.set_defaults(func=_cmd_status)

    rl = sub.add_parser("reload", help="re-read the daemon's config file and apply what can be applied live")
    rl.add_argument("--control", "--control-socket", dest="control", type=Path,
                    help="control socket (default: from the config)")
    rl.add_argument("--config", type=Path, help="only to find the control socket; the daemon "
                    "re-reads the file it was started with")
    rl.add_argument("--runtime-dir", type=Path)
    rl.add_argument("--json", action="store_true", help="raw JSON")
    rl.set_defaults(func=_cmd_reload)

    fl = sub.add_parser("fleet", help="this host in the fleet (a running daemon with [fleet])")
    fl_sub = fl.add_subparsers(metavar="ACTION", required=True)
    rk = fl_sub.add_parser("rekey", help="move this host to its next key epoch now (docs/fleet.md)")
    rk.add_argument("--control", type=Path, help="control socket (default: from the config)")
    rk.add_argument("--config", type=Path)
    rk.add_argument("--runtime-dir", type=Path)
    rk.add_argument("--json", action="store_true", help="raw JSON")
    rk.set_defaults(func=_cmd_fleet_rekey)

    _add_volume_qos(volume_cli.add_parser(sub))
    vpc_cli.add_parser(sub)
    return p


def _add_volume_qos(vsub) -> None:
    qos = vsub.add_parser("qos", help="show or change a running volume's QoS limits, live "
                          "(docs/volumes.md \"QoS\"); options not given stay as they are")
    qos.add_argument("device", help="the [[blk]] id")
    qos.add_argument("--iops", help="I/O requests per second (0: unlimited)")
    qos.add_argument("--throughput", help="data bytes per second, e.g. 100M (decimal units; 0: unlimited)")
    qos.add_argument("--burst-iops", help="IOPS while burst credits last (0: no burst)")
    qos.add_argument("--burst-seconds", type=int, help="how long a full credit bucket lasts at --burst-iops")
    qos.add_argument("--control", type=Path, help="control socket (default: from the config)")
    qos.add_argument("--config", type=Path)
    qos.add_argument("--runtime-dir", type=Path)
    qos.add_argument("--json", action="store_true", help="raw JSON")
    qos.set_defaults(func=_cmd_volume_qos)


def _fail(msg: str, code: int) -> int:
    print(f"nitro: error: {msg}", file=sys.stderr)
    return code


def _load(args) -> config.DaemonConfig:
    return config.load(getattr(args, "config", None),
                       runtime_dir=getattr(args, "runtime_dir", None),
                       state_dir=getattr(args, "state_dir", None))


def _cmd_run(args) -> int:
    from nitro import daemon, log
    from nitro.control.protocol import ControlError
    from nitro.sdnotify import Notifier

    try:
        cfg = _load(args)
    except config.ConfigError as e:
        return _fail(f"config {e}", EXIT_USAGE)
    if args.check:
        print(f"{cfg.source}: ok ({len(cfg.blk)} blk, {len(cfg.net)} net devices, {len(cfg.vpc)} VPCs)")
        return 0
    log.setup_logging(args.log_level or cfg.log_level)
    d = daemon.Daemon(cfg, load_config=_reloader(args))
    try:
        d.open_devices()
    except daemon.StartupError as e:
        return _fail(str(e), EXIT_FAILURE)
    try:
        trio.run(d.run, Notifier.from_environment())
    except (OSError, ControlError) as e:
        return _fail(f"cannot serve: {e}", EXIT_FAILURE)
    except BaseExceptionGroup as eg:
        # Start-up failures inside the nursery (a socket path in use, ...)
        # arrive wrapped; report the first as one line.
        first = _leaf(eg)
        if isinstance(first, (OSError, ControlError)):
            return _fail(f"cannot serve: {first}", EXIT_FAILURE)
        raise
    return 0


# vhost-user.json's VHostUserBackendType for each kind of device nitro serves;
# "block" backends also report "features" (command-line options such as
# --read-only: nitro has none of them).
_CAPABILITIES: dict[str, dict[str, object]] = {"blk": {"type": "block", "features": []}, "net": {"type": "net"}}


def capabilities(cfg: config.DaemonConfig) -> dict | list[dict]:
    """vhost-user.rst "Backend program conventions", --print-capabilities:
    the VHostUserBackendCapabilities object (vhost-user.json) of the one
    device type the config serves. A config serving several types is
    several backends in the convention's sense (a capabilities object has
    one type): then a list of their objects, block first; an empty list
    when it serves no device."""
    served = [dict(c) for kind, c in _CAPABILITIES.items() if getattr(cfg, kind)]
    return served[0] if len(served) == 1 else served


def _print_capabilities(args) -> int:
    """Other options only choose the config, as in `nitro run --config F
    --print-capabilities`; nothing is opened or served."""
    try:
        cfg = _load(args)
    except config.ConfigError as e:
        return _fail(f"config {e}", EXIT_USAGE)
    print(json.dumps(capabilities(cfg)))
    return 0


def _reloader(args):
    """What a reload re-reads: the same file, with the same command-line
    overrides. None on the embedded default (there is no file)."""
    if args.config is None:
        return None
    path = args.config.absolute()  # the daemon never changes directory, but be sure
    return lambda: config.load(path, runtime_dir=args.runtime_dir, state_dir=args.state_dir)


def _leaf(eg: BaseExceptionGroup) -> BaseException:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


def _query(args, request: dict, **kw) -> dict | int:
    """Ask the running daemon over its control socket (--control, else the
    config's); the reply, or the exit code after printing the error."""
    from nitro.control import client

    path = args.control
    if path is None:
        try:
            path = _load(args).control_socket
        except config.ConfigError as e:
            return _fail(f"config {e}", EXIT_USAGE)
    try:
        return client.query(path, request, **kw)
    except client.ControlError as e:
        return _fail(str(e), EXIT_FAILURE)


def _cmd_status(args) -> int:
    from nitro import status_format

    reply = _query(args, {"cmd": "status"})
    if isinstance(reply, int):
        return reply
    if args.json:
        print(json.dumps(status_format.status_document(reply), indent=2))
    else:
        print(status_format.format_status(reply))
    return 0 if reply.get("ok") else EXIT_FAILURE


def _cmd_volume_qos(args) -> int:
    request: dict = {"cmd": "volume_qos", "device": args.device}
    for key in config.QOS_KEYS:
        value = getattr(args, key)
        if value is not None:
            # Plain numbers as integers; "100M" as is (the daemon parses units).
            request[key] = int(value) if isinstance(value, int) or value.isdigit() else value
    reply = _query(args, request)
    if isinstance(reply, int):
        return reply
    if not reply.get("ok"):
        return _fail(reply.get("error", "unknown error"), EXIT_FAILURE)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(f"{reply['device']}: " + " ".join(f"{k}={v}" for k, v in reply["qos"].items()))
    return 0


def _change(args, cmd: str, what: str, describe, timeout: float) -> int:
    """A command that changes the daemon: its reply (raw with --json, else
    ``describe(reply)``), or "<what> refused: ..." and exit 1."""
    reply = _query(args, {"cmd": cmd}, timeout=timeout)
    if isinstance(reply, int):
        return reply
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("ok"):
        print(describe(reply))
    if not reply.get("ok"):
        return _fail(f"{what} refused: {reply.get('error', 'unknown error')}", EXIT_FAILURE)
    return 0


def _cmd_reload(args) -> int:
    from nitro import reload

    # Generous: new volumes are opened (a LUKS unlock takes seconds) and
    # removed ones drained before the daemon answers.
    return _change(args, "reload", "reload", reload.format_result, timeout=120)


def _rekey_result(reply: dict) -> str:
    where = "published in etcd" if reply.get("published") else "NOT yet in etcd: peers follow once it is"
    return f"host {reply.get('host')}: epoch {reply.get('old_epoch')} -> {reply.get('epoch')} ({where})"


def _cmd_fleet_rekey(args) -> int:
    return _change(args, "fleet-rekey", "rekey", _rekey_result, timeout=30)
