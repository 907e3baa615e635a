"""Live configuration reload: what a new config file changes, as a plan.

Sans-IO: :func:`plan` compares the running configuration with a freshly
loaded (and therefore fully validated) one and says what to do; the daemon
(daemon.py ``Daemon.reload``) carries the plan out. Rules, by device id:

- a ``[[blk]]`` id only in the new file is *added* (opened, then listening);
- a ``[[blk]]`` id only in the running config is *removed* (drained, its
  frontend disconnected, volume flushed and closed, socket unlinked);
- an id in both with equal settings is *unchanged* and not touched at all;
- an id in both whose ``qos`` differs gets the new limits *live* (``qos``):
  the device keeps serving, its queues see the new budget at once;
- an id in both with other settings different *needs a restart*: it keeps
  running with its old settings (its ``qos`` change, if any, still applies).
  Changing a disk under a guest is never done silently; removing it (one
  reload) and adding it back (another) is the operator's explicit choice;
- an added device whose socket or image is in use by a running device
  (including one removed by the same reload) is *refused*: two devices must
  never share a socket or an image lock, and removing first would leave the
  reload half-applied if the new device then failed to open. Reload once
  without the old device, then again with the new one;
- ``[[net]]`` and ``[[vpc]]`` changes and daemon-wide settings (``[daemon]``,
  ``[metrics]``) need a restart: the C switch has no port removal and its
  tables are read by running TX workers without a lock.

The running configuration after the reload (``ReloadPlan.running``) keeps
the old settings of everything not applied, so the next reload diffs
against what really runs and reports a pending restart again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from nitro.config import BlkConfig, DaemonConfig

__all__ = ["Change", "ReloadPlan", "plan", "format_result"]

# Daemon-wide settings: fixed for the life of the process.
_DAEMON_KEYS = (
    ("runtime_dir", "daemon.runtime_dir"),
    ("state_dir", "daemon.state_dir"),
    ("control_socket", "daemon.control_socket"),
    ("log_level", "daemon.log_level"),
    ("metrics_listen", "metrics.listen"),
    ("engine", "daemon.workers/cpus/poll_us/seccomp/max_guest_memory"),
    ("fleet", "fleet"),
)


@dataclasses.dataclass(frozen=True)
class Change:
    """One change that a reload does not apply."""

    kind: str    # "blk", "net", "vpc", "daemon"
    id: str      # device/VPC id, or the config key for "daemon"
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    add: tuple[BlkConfig, ...]
    remove: tuple[BlkConfig, ...]
    qos: tuple[BlkConfig, ...]         # running devices whose QoS changes live (their new config)
    unchanged: tuple[str, ...]
    needs_restart: tuple[Change, ...]  # valid changes that only a restart applies
    refused: tuple[Change, ...]        # additions that conflict with running devices
    running: DaemonConfig              # what runs once add/remove are applied

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove or self.qos)


def plan(old: DaemonConfig, new: DaemonConfig) -> ReloadPlan:
    """The running config ``old`` and a loaded config ``new`` -> what to do."""
    restart: list[Change] = []
    for attr, key in _DAEMON_KEYS:
        a, b = getattr(old, attr), getattr(new, attr)
        if a != b:
            restart.append(Change("daemon", key, f"changed from {str(a)!r} to {str(b)!r}; needs a restart"))

    old_blk = {b.id: b for b in old.blk}
    new_blk = {b.id: b for b in new.blk}
    remove = tuple(b for b in old.blk if b.id not in new_blk)
    unchanged = tuple(b.id for b in old.blk if new_blk.get(b.id) == b)
    qos: list[BlkConfig] = []
    kept: dict[str, BlkConfig] = {}  # what runs after this reload, by id
    for b in old.blk:
        n = new_blk.get(b.id)
        if n is None or n == b:
            continue
        if n.qos != b.qos:
            qos.append(n)
            kept[b.id] = b = dataclasses.replace(b, qos=n.qos)
        if n != b:
            restart.append(Change("blk", b.id, f"settings changed ({_fields_changed(b, n)}); "
                                  "needs a restart, or remove it in one reload and add it in another"))

    restart += _by_id("vpc", old.vpc, new.vpc)
    restart += _by_id("net", old.net, new.net)

    # Sockets and images held by devices that keep running (every net device:
    # net changes are not applied) and by devices this reload removes.
    removed_ids = {b.id for b in remove}
    held: dict[Any, str] = {}
    for b in old.blk:
        if b.id not in removed_ids:
            held[b.socket] = held[b.image] = f"running device {b.id!r}"
    for net in old.net:
        held[net.socket] = f"running device {net.id!r}"
    for b in remove:
        held.setdefault(b.socket, f"device {b.id!r}, removed by this reload")
        held.setdefault(b.image, f"device {b.id!r}, removed by this reload")

    add: list[BlkConfig] = []
    refused: list[Change] = []
    for b in new.blk:
        if b.id in old_blk:
            continue
        clash = [(what, path) for what, path in (("socket", b.socket), ("image", b.image)) if path in held]
        if clash:
            what, path = clash[0]
            hint = ("; reload once without the old device, then again with the new one"
                    if "removed by this reload" in held[path] else "")
            refused.append(Change("blk", b.id, f"not added: its {what} {path} is in use by {held[path]}{hint}"))
        else:
            add.append(b)

    running_blk = tuple(kept.get(b.id, b) for b in old.blk if b.id not in removed_ids) + tuple(add)
    return ReloadPlan(add=tuple(add), remove=remove, qos=tuple(qos), unchanged=unchanged,
                      needs_restart=tuple(restart), refused=tuple(refused),
                      running=dataclasses.replace(old, blk=running_blk))


def _fields_changed(a: Any, b: Any) -> str:
    names = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return ", ".join(names)


def _by_id(kind: str, old: Iterable[Any], new: Iterable[Any]) -> list[Change]:
    """[[net]]/[[vpc]] differences, each reported as needing a restart."""
    olds = {x.id: x for x in old}
    news = {x.id: x for x in new}
    changes = []
    for i in [*olds, *(i for i in news if i not in olds)]:
        a, b = olds.get(i), news.get(i)
        if a == b:
            continue
        what = "added" if a is None else "removed" if b is None else f"changed ({_fields_changed(a, b)})"
        changes.append(Change(kind, i, f"{what}; [[{kind}]] changes need a restart"))
    return changes


def format_result(reply: dict) -> str:
    """A ``reload`` reply -> the text ``nitro reload`` prints."""
    if not reply.get("ok"):
        return f"reload refused: {reply.get('error', 'unknown error')}"
    lines = [f"reloaded {reply.get('config', '?')}"]
    for key, label in (("added", "added"), ("removed", "removed"), ("qos", "qos changed")):
        for dev in reply.get(key) or []:
            lines.append(f"  {label}: {dev}")
    unchanged = reply.get("unchanged") or []
    lines.append(f"  unchanged: {', '.join(unchanged) if unchanged else '(none)'}")
    for key, label in (("needs_restart", "needs restart"), ("refused", "not applied")):
        for c in reply.get(key) or []:
            lines.append(f"  {label}: {c.get('kind')} {c.get('id')}: {c.get('reason')}")
    if not (reply.get("added") or reply.get("removed") or reply.get("qos")):
        lines.append("  nothing applied")
    return "\n".join(lines)
