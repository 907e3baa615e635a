"""This host's fleet identity: its host index (claimed in etcd) and its key
epoch (kept in its state directory). docs/fleet.md "Key schedule".

- **Host index**: a number in 1..2^24-1, unique in the fleet, the high 24
  bits of every SPI this host sends under. A host claims one by creating
  ``/nitro/index/<n>`` (value: its id) in a transaction that requires the
  key to be absent, so of two hosts racing for one number exactly one
  wins; the other reads the claims again and tries the next free number.
  The key has no lease: the index stays with its host across restarts and
  outages. A host that already holds an index gets it back (the lowest it
  holds), whatever its state directory says: etcd decides.
- **Epoch**: the last epoch this host sent under is written to its state
  directory *before* it sends under it (at start-up and at each rekey), so
  :func:`nitro.fleet.tunnel.start_epoch` can always go past it.

Both live in ``<state_dir>/fleet-host.json``; the index is there too so a
host restarted while etcd is down still knows it. :func:`choose_index` and
the file are sans-IO; :func:`claim_index` talks to etcd.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from nitro.fleet import schema
from nitro.fleet.etcd import EtcdClient
from nitro.fleet.etcd_codec import Compare, KeyValue, op_put
from nitro.fleet.schema import HostRecord, RecordError
from nitro.log import log_event

__all__ = ["IdentityError", "LocalState", "choose_index", "claim_index", "index_owners", "load_local",
           "read_published_epoch", "save_local"]

log = logging.getLogger("nitro.fleet")

STATE_FILE = "fleet-host.json"
MAX_CLAIM_ATTEMPTS = 64  # each failed attempt means another host took a number meanwhile


class IdentityError(Exception):
    """No host index can be claimed (every number taken, or too many lost
    races in a row) or the state file cannot be written: the daemon does
    not start; the message says which."""


@dataclasses.dataclass(frozen=True)
class LocalState:
    """What ``fleet-host.json`` holds for ``host``."""
    host: str
    index: int | None = None
    epoch: int | None = None  # the last epoch this host sent under (or was about to)


def load_local(path: Path, host: str) -> LocalState:
    """The state file, or an empty state when it is missing or unreadable
    (logged: losing it is safe, the epoch then starts at the Unix time and
    the index comes back from etcd). A file another host id wrote gives no
    index (that id's) but its epoch (epochs only need to grow)."""
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        epoch, index = doc.get("epoch"), doc.get("index")
        for name, v in (("epoch", epoch), ("index", index)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} {v!r} is not a non-negative integer")
    except FileNotFoundError:
        return LocalState(host)
    except (OSError, ValueError) as e:
        log_event(log, logging.WARNING, "fleet host state unreadable; starting without it",
                  path=str(path), error=str(e))
        return LocalState(host)
    if doc.get("host") != host:
        return LocalState(host, None, epoch)
    return LocalState(host, index or None, epoch)


def save_local(path: Path, state: LocalState) -> None:
    """Write the state file atomically and durably. IdentityError when it
    cannot be written."""
    try:
        write_atomically(path, json.dumps(dataclasses.asdict(state), sort_keys=True).encode() + b"\n")
    except OSError as e:
        raise IdentityError(f"fleet host state {path}: cannot write: {e.strerror}") from None


def write_atomically(path: Path, body: bytes) -> None:
    """A new file (mode 0600) renamed over the old one, both synced: after
    a crash `path` holds the old or the new body, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def index_owners(kvs: Iterable[KeyValue]) -> dict[int, str]:
    """The claims under /nitro/index/: index -> host id (unreadable keys are
    skipped: they hold no number anyone can use)."""
    owners = {}
    for kv in kvs:
        try:
            kind, n = schema.decode_key(kv.key)
            if kind == "index":
                owners[n] = schema.decode_value(kind, n, kv.value)
        except RecordError:
            continue
    return owners


def choose_index(owners: Mapping[int, str], host: str, wanted: int | None = None) -> tuple[int, bool]:
    """(index, already held by ``host``): the lowest index the host holds;
    else ``wanted`` (its state directory's) if free; else the lowest free
    one. IdentityError when all 2^24-1 are taken."""
    held = sorted(n for n, h in owners.items() if h == host)
    if held:
        return held[0], True
    if wanted is not None and 1 <= wanted <= schema.MAX_HOST_INDEX and wanted not in owners:
        return wanted, False
    n = next((i for i in range(1, len(owners) + 2) if i not in owners), None)
    if n is None or n > schema.MAX_HOST_INDEX:
        raise IdentityError(f"every host index 1..{schema.MAX_HOST_INDEX} is taken")
    return n, False


async def claim_index(etcd: EtcdClient, host: str, wanted: int | None = None) -> int:
    """This host's index: the one it holds in etcd, else a new one claimed
    by a transaction (``/nitro/index/<n>`` absent -> put). EtcdError when
    etcd fails; IdentityError after MAX_CLAIM_ATTEMPTS lost races."""
    for _ in range(MAX_CLAIM_ATTEMPTS):
        claims = await etcd.range(schema.INDEXES.encode(), prefix=True)
        n, held = choose_index(index_owners(claims.kvs), host, wanted)
        if held:
            return n
        key = schema.index_key(n)
        if (await etcd.txn([Compare.missing(key)], [op_put(key, host.encode())])).succeeded:
            log_event(log, logging.INFO, "fleet host index claimed", host=host, index=n)
            return n
        wanted = None  # somebody took it between our read and our txn: the next free one
    raise IdentityError(f"no host index claimed for {host} in {MAX_CLAIM_ATTEMPTS} attempts "
                        "(other hosts kept taking the free ones)")


async def read_published_epoch(etcd: EtcdClient, host: str) -> int | None:
    """The epoch in this host's record, if etcd still has it (a restart
    within the lease's TTL, or an unreadable record: None)."""
    kv = await etcd.get(f"{schema.HOSTS}{host}".encode())
    if kv is None:
        return None
    try:
        return HostRecord.decode(host, kv.value).epoch
    except RecordError:
        return None
