"""Volumes on an NBD export: `source = "nbd://host:port/export"` (or
`nbds://` with TLS: a PSK file or a certificates directory).

The export is the volume, byte for byte (a LUKS2 volume on it is unlocked
by nitro: backends/luks.py). Requests go from the engine's workers to the
server through libnbd's asynchronous calls (cffi_build/nitro_nbd.c), one
connection per queue. Connecting blocks (DNS, TCP, the TLS handshake), so it
is done here, on a trio thread-pool thread, and the connected handle is
handed to the queue's worker; when a connection dies the worker keeps its
requests waiting and asks for a new one, which `_connect_loop` makes with
exponential backoff (`BACKOFF_*`) for as long as it takes: only a request's
own `io_timeout` turns an outage into an error for the guest
(docs/volumes.md "Failures").

Several queues need several connections, whose writes a FLUSH on one of
them covers only if the server says so (NBD_FLAG_CAN_MULTI_CONN); on a
server that does not, a volume with more than one queue is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import trio

from nitro import _datapath
from nitro.config import DEFAULT_IO_TIMEOUT
from nitro.devices.blk.backends.raw import (
    MIN_REMOTE_WAIT_S,
    UNREACHABLE,
    SourceUnavailableError,
    VolumeError,
)
from nitro.devices.blk.config import SECTOR_SIZE
from nitro.log import log_event

log = logging.getLogger("nitro.blk.nbd")

DEFAULT_PORT = 10809  # the IANA port of NBD
SCHEMES = {"nbd": False, "nbds": True}  # scheme -> TLS required
BACKOFF_START = 0.05       # seconds between failed connects: doubled up to
BACKOFF_MAX = 5.0
# A connection that dies sooner than this after it was handed over counts as
# a failed connect: a server (or a middlebox) that accepts and then drops
# every connection at its first request would otherwise be reconnected to in
# a tight loop, hundreds of times a second, until the request's io_timeout.
STABLE_S = 1.0


@dataclasses.dataclass(frozen=True)
class NbdSource:
    """A parsed `source` and its TLS options."""
    host: str
    port: int
    export: str
    tls: bool
    tls_psk_file: Path | None = None
    tls_username: str | None = None
    tls_certificates: Path | None = None

    def _url(self, scheme: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{quote(self.export, safe='')}"

    @property
    def uri(self) -> str:
        """What libnbd connects to (no credentials in it: those are files)."""
        return self._url("nbds" if self.tls else "nbd")

    @property
    def volume_name(self) -> str:
        """The export's name in the fleet's volume locks (nitro/fleet/volume_lock.py):
        the URI with the scheme always ``nbd``: with TLS or without, it is the same data."""
        return self._url("nbd")

    def __str__(self) -> str:
        return self.uri


def parse_source(url: str, *, tls_psk_file: Path | None = None,
                 tls_username: str | None = None,
                 tls_certificates: Path | None = None) -> NbdSource:
    """`nbd://host[:port][/export]`, `nbds://...`. ValueError says what is
    wrong; nothing is contacted."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"expected nbd://host[:port]/export or nbds://..., got {url!r}")
    tls = SCHEMES[parts.scheme]
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment: TLS options are keys of their own "
                         "(tls_psk_file, tls_username, tls_certificates)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no user in the URL: give tls_username")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port if parts.port is not None else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if port == 0:
        raise ValueError(f"bad port in {url!r}")
    if not tls and (tls_psk_file or tls_username or tls_certificates):
        raise ValueError("TLS options need an nbds:// source")
    if tls_psk_file and tls_certificates:
        raise ValueError("give one of tls_psk_file or tls_certificates")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if len(export.encode()) > 4096:
        raise ValueError("export name longer than 4096 bytes (NBD's limit)")
    return NbdSource(parts.hostname, port, export, tls, tls_psk_file, tls_username,
                     tls_certificates)


def connect(src: NbdSource, timeout: float = DEFAULT_IO_TIMEOUT) -> _datapath.NbdHandle:
    """A connected handle (blocking: never on the trio thread), the
    handshake and each later call on it bounded by `timeout` (a volume's
    io_timeout). NbdError (errno ETIMEDOUT: no answer in time)."""
    return _datapath.NbdHandle(
        src.uri,
        tls_psk_file=str(src.tls_psk_file) if src.tls_psk_file else None,
        tls_username=src.tls_username,
        tls_certificates=str(src.tls_certificates) if src.tls_certificates else None,
        timeout=timeout)


def connect_error(src: NbdSource, e: _datapath.NbdError) -> VolumeError:
    """What a failed connect() means: SourceUnavailableError when the
    server was unreachable (worth waiting for), else VolumeError. Over TLS
    a server that ends the handshake (no errno) most likely refused the
    key or certificate: said so."""
    if e.errno in UNREACHABLE:
        return SourceUnavailableError(f"{src}: cannot connect: {e}")
    hint = ""
    if src.tls and e.errno == 0:
        hint = (f" (the server ended the TLS handshake: does {src.tls_psk_file} hold its key "
                f"for user {src.tls_username}?)" if src.tls_psk_file else
                " (the server ended the TLS handshake: does it trust tls_certificates?)")
    return VolumeError(f"{src}: cannot connect: {e}{hint}")


def check_export(src: NbdSource, info: dict[str, int], *, queues: int, readonly: bool) -> None:
    """Can this export be served as configured? VolumeError if not."""
    if info["size"] == 0 or info["size"] % SECTOR_SIZE:
        raise VolumeError(f"{src}: export size {info['size']} is not a positive multiple of "
                          f"{SECTOR_SIZE} bytes")
    if info["readonly"] and not readonly:
        raise VolumeError(f"{src}: the server exports it read-only; set readonly = true")
    if queues > 1 and not info["can_multi_conn"]:
        raise VolumeError(f"{src}: {queues} queues need one connection each, and the server "
                          "does not offer multi-conn (a flush on one connection would not "
                          "cover writes on the others); use queues = 1")
    if info["min_block"] > SECTOR_SIZE:
        raise VolumeError(f"{src}: the server's minimum block size {info['min_block']} is "
                          f"larger than the {SECTOR_SIZE}-byte sectors virtio-blk sends")


class NbdVolume:
    """The volume interface of RawImage (see BlkDevice) for an NBD export."""

    block_size = SECTOR_SIZE
    data_offset = 0
    xts = None
    fd = -1  # no local file: the rings talk to the server

    def __init__(self, src: NbdSource, info: dict[str, int], conns: list[_datapath.NbdConn],
                 want_fd: int, readonly: bool, io_timeout: float = DEFAULT_IO_TIMEOUT,
                 first: _datapath.NbdHandle | None = None) -> None:
        self.src, self.info, self.conns = src, info, conns
        # The connection open() made, until the first ring takes it for
        # queue 0: block_io() (a LUKS2 header, `nitro volume`) uses it
        # meanwhile, so a server that allows one client (qemu-nbd's
        # default) serves both.
        self._first = first
        self.readonly, self.io_timeout = readonly, io_timeout
        self.size = info["size"]
        # DISCARD and WRITE_ZEROES go to the server only if it does both.
        self.supports_discard = bool(info["can_trim"] and info["can_zero"])
        self._want_fd = want_fd
        # Closing vs the connector offering, and vs a flush in progress.
        self._lock = threading.Condition()
        self._flushing = 0
        self._closed = False
        self._connector_running = False

    @classmethod
    def open(cls, src: NbdSource, *, queues: int, io_timeout: float,
             readonly: bool) -> NbdVolume:
        """Connect once (blocking) to learn the export, check it, and keep
        that connection for queue 0 (block_io's until a ring starts).
        VolumeError when it cannot be served."""
        try:
            handle = connect(src, io_timeout)
        except _datapath.NbdError as e:
            raise connect_error(src, e) from None
        try:
            info = handle.info()
            check_export(src, info, queues=queues, readonly=readonly)
            want_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            ns = max(1, int(io_timeout * 1e9))
            conns = [_datapath.NbdConn(want_fd, ns) for _ in range(queues)]
        except BaseException:
            handle.close()
            raise
        return cls(src, info, conns, want_fd, readonly, io_timeout, first=handle)

    @property
    def path(self) -> str:
        return str(self.src)

    @property
    def capacity_sectors(self) -> int:
        return self.size // SECTOR_SIZE

    @contextlib.contextmanager
    def block_io(self) -> Iterator[_datapath.NbdHandle]:
        """A connection for synchronous reads and writes (a LUKS2 header,
        backends/luks.py): open()'s while no ring has taken it, else one of
        its own, closed on exit (the queues' are the workers'). Blocking:
        not on the trio thread."""
        with self._lock:
            first = self._first
        if first is not None:
            yield first
            return
        try:
            handle = connect(self.src, self.io_timeout)
        except _datapath.NbdError as e:
            raise connect_error(self.src, e) from None
        try:
            yield handle
        finally:
            handle.close()

    def make_ring(self, vq: _datapath.Virtqueue, params: _datapath.BlkParams,
                  stats: _datapath.BlkStats, index: int) -> _datapath.Ring:
        """Queue `index`'s ring (trio thread: hands open()'s connection to
        queue 0 and starts the connector, once)."""
        with self._lock:
            first, self._first = self._first, None
        if first is not None:
            self.conns[0].offer(first)
        self._start_connector()
        return _datapath.Ring.nbd(vq, params, stats, self.conns[index])

    def flush(self, timeout: float | None = None) -> None:
        """Every queue's connection flushed (rings detached: drain, reload),
        all within `timeout` s (default io_timeout; each connection gets
        MIN_REMOTE_WAIT_S at least); TimeoutError after it, the silent connection
        hung up (a server that hangs without closing it would hold the
        caller for ever). The lock is not held meanwhile: the connector
        takes it on the trio thread; close() waits for the flush."""
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        with self._lock:
            if self._closed:
                return
            self._flushing += 1
        try:
            for c in self.conns:
                try:
                    c.flush(max(MIN_REMOTE_WAIT_S, deadline - time.monotonic()))
                except _datapath.NbdError as e:
                    raise OSError(errno.EIO, f"{self.src}: {e}") from None
                except TimeoutError:
                    raise TimeoutError(errno.ETIMEDOUT, f"{self.src}: no answer to a flush in time "
                                       f"(io_timeout {self.io_timeout:g} s); hung up") from None
        finally:
            with self._lock:
                self._flushing -= 1
                self._lock.notify_all()

    def statistics(self) -> dict[str, int]:
        """Every connection's counters, summed; `connections`: how many
        there are (one per queue; `connected` of them are up)."""
        total: dict[str, int] = {"connections": len(self.conns)}
        for c in self.conns:
            for k, v in c.stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._flushing:  # not under a flush's feet (a reload's, say)
                self._lock.wait()
            if self._first is not None:  # no ring ever took it
                self._first.close()
                self._first = None
            for c in self.conns:
                c.close()  # closes its handles (the rings were freed)
            if self._connector_running:
                _signal(self._want_fd)  # the connector closes it on its way out
            else:
                os.close(self._want_fd)

    # -- the connector (a trio system task: no thread of its own) ---------
    def _start_connector(self) -> None:
        with self._lock:
            if self._connector_running or self._closed:
                return
            self._connector_running = True
        trio.lowlevel.spawn_system_task(self._connect_loop, name=f"nbd-connect {self.src}")

    async def _connect_loop(self) -> None:
        try:
            await self._serve_wants()
        except Exception:  # a system task's exception would end the daemon
            log.exception("NBD connector failed", extra={"fields": {"source": str(self.src)}})
        finally:
            with self._lock:
                self._connector_running = False
                if self._closed:
                    os.close(self._want_fd)

    async def _serve_wants(self) -> None:
        backoff = BACKOFF_START
        failing = False   # connects fail: the server is unreachable
        churning = False  # connections die right after they are made
        offered_at: dict[int, float] = {}  # queue -> when its last handle went
        while True:
            with self._lock:
                if self._closed:
                    return
                for c in self.conns:
                    c.reap()
                wanting = [i for i, c in enumerate(self.conns) if c.wants]
            if not wanting:
                await trio.lowlevel.wait_readable(self._want_fd)
                _drain(self._want_fd)
                continue
            queue = wanting[0]
            last = offered_at.pop(queue, None)
            short_lived = last is not None and trio.current_time() - last < STABLE_S
            if short_lived:
                if not churning:
                    log_event(log, logging.WARNING,
                              "NBD connection lost right after connecting; retrying with backoff",
                              source=str(self.src), queue=queue)
                churning = True
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                churning = False
            try:
                handle = await trio.to_thread.run_sync(self._connect_checked, abandon_on_cancel=True)
            except (_datapath.NbdError, VolumeError) as e:
                if not failing:
                    log_event(log, logging.WARNING, "NBD server unreachable; retrying",
                              source=str(self.src), error=str(e))
                failing = True
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if failing:
                log_event(log, logging.INFO, "NBD server reachable again", source=str(self.src))
            failing = False
            if not short_lived:
                backoff = BACKOFF_START
            with self._lock:
                if self._closed:
                    handle.close()
                    return
                self.conns[queue].offer(handle)
            offered_at[queue] = trio.current_time()

    def _connect_checked(self) -> _datapath.NbdHandle:
        """A new connection to the same export: same size and abilities, or
        VolumeError (the server changed under us; keep trying)."""
        handle = connect(self.src, self.io_timeout)
        info = handle.info()
        changed = [k for k in ("size", "readonly", "can_flush", "can_trim", "can_zero")
                   if info[k] != self.info[k]]
        if changed:
            handle.close()
            raise VolumeError(f"the export changed ({', '.join(changed)}); not using it")
        return handle


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
