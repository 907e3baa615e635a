"""The trio layer of vhost-user: the only code that touches the socket.

One VhostUserServer per device socket. It accepts one frontend at a time
(vhost-user is one front-end to one back-end), reads exactly one message at
a time so SCM_RIGHTS fds can never be attributed to the wrong message, and
feeds the sans-IO codec and dispatcher. It serves no ring itself: each
started vring becomes a C ring attached to one of the engine's workers
(nitro/engine.py), which serve every ring of every device.

Before applying a message that changes a running vring (or the memory table
under all of them) the affected rings are detached and awaited: C never
sees a ring or mapping change under its feet. After the message, vrings
whose `should_run` became true are attached ("quiesce, apply, reconcile").
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from nitro import _datapath
from nitro.engine import Engine
from nitro.log import log_event
from nitro.vhost.backend import VhostUserBackend
from nitro.vhost.codec import FrontendConnection, Message, ProtocolError
from nitro.vhost.protocol import HEADER_SIZE, MAX_PAYLOAD_SIZE
from nitro.vhost.vring import Vring

if TYPE_CHECKING:
    from nitro.devices.base import VirtioBackend

Socket = trio.socket.SocketType

log = logging.getLogger("nitro.vhost")

MAX_FDS = 32           # SET_MEM_TABLE carries at most 8; be generous, then check


class AttachedRing:
    """A vring the engine serves: its C ring, and while it is being taken
    back, the event that says it is gone."""

    def __init__(self, vring: Vring, ring: _datapath.Ring) -> None:
        self.vring = vring
        self.ring = ring
        self.stopping: trio.Event | None = None


class VhostUserServer:
    def __init__(self, device: VirtioBackend, socket_path: Path, *, device_id: str, engine: Engine) -> None:
        self.device = device
        self.engine = engine
        self.socket_path = Path(socket_path)
        self.device_id = device_id
        self.connected = False
        self.connections = 0
        self.protocol_errors = 0
        self.broken: str | None = None
        self._backend: VhostUserBackend | None = None
        self._rings: dict[int, AttachedRing] = {}
        self._err_pending: set[int] = set()  # rings whose err eventfd is being signalled
        self._session_nursery: trio.Nursery | None = None
        # Queue counters of past sessions, so counters stay monotonic across
        # reconnects (each session gets fresh C queues).
        self._retired: dict[int, dict[str, Any]] = {}
        # statistics() runs on other threads (metrics scrapes) and reads the
        # session's C queues: it holds this while it does, and the session
        # ends (C queues freed) only under it. Held for microseconds on
        # either side; the daemon's devices_lock is taken before it, never
        # after.
        self._stats_lock = threading.Lock()
        self._accepting = True
        self._listener: trio.socket.SocketType | None = None
        self._serve_scope = trio.CancelScope()
        self._served = trio.Event()  # set when serve() has returned

    # -- lifecycle ---------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._listener = await self._listen()
        task_status.started()
        try:
            with self._serve_scope:
                while self._accepting:
                    conn, _ = await self._listener.accept()
                    with conn:
                        try:
                            await self._run_session(conn)
                        except Exception:
                            # A bug must cost this session, not the daemon and
                            # every other guest on it.
                            log.exception("session failed", extra={"fields": {"device": self.device_id}})
        finally:
            self._listener.close()
            self._served.set()

    async def _listen(self) -> trio.socket.SocketType:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.socket_path.unlink()  # a stale socket from a previous run
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o660)
        sock.listen(1)
        return sock

    def stop_accepting(self) -> None:
        """No new frontend and no new ring served from now on (drain)."""
        self._accepting = False

    async def stop_all_workers(self) -> None:
        """Take every ring back from the engine (in-flight requests complete),
        side by side: a ring fetches requests until its own detach starts,
        so one after another each remote ring of a volume whose storage is
        away would wait its io_timeout in turn."""
        async with trio.open_nursery() as nursery:
            for i in list(self._rings):
                nursery.start_soon(self._detach, [i])

    async def shutdown(self) -> None:
        """End this device's serving for good (reload removed it): stop
        accepting, take the rings back from the engine (in-flight requests
        complete), then end the session (the frontend sees a disconnect) and
        close the listener. The caller flushes and closes the device and
        unlinks the socket. Only for a server whose serve() has started."""
        self.stop_accepting()
        await self.stop_all_workers()
        self._serve_scope.cancel()
        await self._served.wait()

    # -- one frontend ------------------------------------------------------
    async def _run_session(self, conn: Socket) -> None:
        self.connections += 1
        self.connected = True
        self.broken = None
        backend = VhostUserBackend(self.device)
        self._backend = backend
        codec = FrontendConnection()
        fields = {"device": self.device_id}
        log_event(log, logging.INFO, "frontend connected", **fields)
        try:
            async with trio.open_nursery() as nursery:
                self._session_nursery = nursery
                try:
                    await self._message_loop(conn, codec, backend)
                except ProtocolError as e:
                    self.protocol_errors += 1
                    log_event(log, logging.WARNING, "frontend protocol error; disconnecting",
                              error=str(e), **fields)
                except OSError as e:
                    log_event(log, logging.WARNING, "frontend socket error",
                              error=str(e), **fields)
                finally:
                    # Shielded: on shutdown we are cancelled, yet the workers
                    # must let go of the rings before memory is unmapped.
                    with trio.CancelScope(shield=True):
                        await self.stop_all_workers()
                    nursery.cancel_scope.cancel()
        finally:
            self._session_nursery = None
            self.connected = False
            self._end_session(backend)
            self.device.reset()
            log_event(log, logging.INFO, "frontend disconnected", **fields)

    def _end_session(self, backend: VhostUserBackend) -> None:
        """Fold the session's queue counters into the retired ones and free
        its C queues and memory, never under a statistics() in progress."""
        with self._stats_lock:
            self._backend = None
            self._retire(backend)
        backend.close()  # no statistics() can reach it any more

    async def _message_loop(self, conn: Socket, codec: FrontendConnection,
                            backend: VhostUserBackend) -> None:
        while True:
            got = await _recv_message(conn)
            if got is None:
                return  # EOF: QEMU exited or the guest went away
            data, fds = got
            codec.receive_data(data, fds)
            # next_event() gives Messages until it needs more bytes (NEED_DATA).
            while isinstance(msg := codec.next_event(), Message):
                affected = backend.affected_vrings(msg)
                await self._detach(list(self._rings) if affected == "all" else list(affected))
                resets = backend.resets
                reply = backend.handle(msg)
                if backend.resets != resets:
                    self._revive()
                if reply:
                    await _send_all(conn, reply, getattr(reply, "fds", ()))
                await self._reconcile(backend)

    def _revive(self) -> None:
        """The front-end reset the device (RESET_DEVICE, RESET_OWNER, SET_STATUS
        0: a driver reset or guest reboot): every ring was detached and its C
        queue reset, faults included, so the next start serves again. Except
        a frontend that jammed its own eventfd: that was no driver bug, and
        reviving it would let it stall a worker again at every reset."""
        if self.broken == _datapath.FAULT_EVENTFD:
            log_event(log, logging.WARNING, "device reset by the frontend; stays broken "
                      "until it reconnects", device=self.device_id, fault=self.broken)
            return
        if self.broken is not None:
            log_event(log, logging.INFO, "device reset by the frontend; no longer broken",
                      device=self.device_id, fault=self.broken)
        self.broken = None

    # -- rings on the engine -------------------------------------------------
    async def _reconcile(self, backend: VhostUserBackend) -> None:
        if self.broken or not self._accepting:
            return
        for vring in backend.vrings:
            if vring.should_run and vring.index not in self._rings:
                await self._attach(vring)

    async def _attach(self, vring: Vring) -> None:
        ring = self.device.make_ring(vring)
        self.device.on_vring_start(vring)
        attached = AttachedRing(vring, ring)
        self._rings[vring.index] = attached
        try:
            await self.engine.attach(ring, lambda e: self._ring_failed(vring, e),
                                     label=f"{self.device_id}/{vring.index}")
        except _datapath.DatapathError as e:
            del self._rings[vring.index]
            self.device.on_vring_stop(vring)
            ring.close()
            self._mark_broken(vring, _fault_kind(e))

    async def _detach(self, indexes: list[int]) -> None:
        for i in indexes:
            attached = self._rings.get(i)
            if attached is None:
                continue
            if attached.stopping is not None:
                # Another task is taking it back: wait, so that whatever we
                # do next (a new memory table) never runs under a served ring.
                await attached.stopping.wait()
                continue
            attached.stopping = trio.Event()
            try:
                self.device.on_vring_stop(attached.vring)
                await self.engine.detach(attached.ring)
            finally:
                attached.ring.close()
                del self._rings[i]
                attached.stopping.set()

    def _ring_failed(self, vring: Vring, error: _datapath.DatapathError) -> None:
        """The engine found the ring stopped on an error (trio thread)."""
        self._mark_broken(vring, _fault_kind(error))
        nursery = self._session_nursery
        if nursery is not None:
            nursery.start_soon(self._detach, list(self._rings))

    def _mark_broken(self, vring: Vring, kind: str) -> None:
        """A guest fault breaks the device (not the daemon): stop every queue
        until the frontend resets or reconnects, and tell it through the
        ring's SET_VRING_ERR eventfd."""
        self.broken = kind
        vring.broken = kind
        log_event(log, logging.ERROR, "guest broke the device; queues stopped",
                  device=self.device_id, queue=vring.index, fault=kind)
        nursery = self._session_nursery
        if vring.err_fd is not None and nursery is not None and vring.index not in self._err_pending:
            self._err_pending.add(vring.index)
            nursery.start_soon(self._signal_err, vring.index, os.dup(vring.err_fd))

    async def _signal_err(self, index: int, fd: int) -> None:
        """Write 1 to a ring's err eventfd (our own dup: the ring may close
        its fd meanwhile). In a thread: the front-end can make its eventfd
        blocking again and hold its counter full, and the trio thread must
        never wait on a front-end. One pending signal per ring at most."""
        try:
            await trio.to_thread.run_sync(_signal_eventfd, fd, abandon_on_cancel=True)
        finally:
            self._err_pending.discard(index)

    # -- observation -------------------------------------------------------
    def _retire(self, backend: VhostUserBackend) -> None:
        for v in backend.vrings:
            self._retired[v.index] = _add_queue_stats(self._retired.get(v.index), v.vq.stats())

    def statistics(self) -> dict[str, Any]:
        stats = self.device.statistics()
        with self._stats_lock:
            backend = self._backend
            live = {v.index: v for v in backend.vrings} if backend is not None else {}
            counters = {}
            for index in sorted(set(live) | set(self._retired)):
                v = live.get(index)
                counters[index] = _add_queue_stats(self._retired.get(index), v.vq.stats() if v else None)
        queues = []
        for index, q in counters.items():
            v = live.get(index)
            attached = self._rings.get(index)
            worker = self.engine.worker_of(attached.ring) if attached is not None else None
            queues.append({"index": index, "enabled": bool(v and v.enabled),
                           "running": attached is not None, "worker": worker, **q})
        stats.update({
            "id": self.device_id,
            "socket": str(self.socket_path),
            "connected": self.connected,
            "broken": self.broken,
            "features": backend.acked_features if backend else 0,
            "protocol_features": backend.acked_protocol_features if backend else 0,
            "queues": queues,
            "protocol_errors": self.protocol_errors,
            "connections": self.connections,
        })
        return stats


def _signal_eventfd(fd: int) -> None:
    """eventfd_write(fd, 1) without blocking if the file still lets us, then
    close fd. EAGAIN (counter saturated) means it is readable anyway."""
    try:
        os.set_blocking(fd, False)
        os.eventfd_write(fd, 1)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fault_kind(error: _datapath.DatapathError) -> str:
    if isinstance(error, _datapath.GuestFault):
        return error.kind
    return f"host:{error}"


def _add_queue_stats(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    zero: dict[str, Any] = {"kicks": 0, "calls": 0, "chains": 0, "faults": {}}
    a, b = a or zero, b or zero
    faults = dict(a["faults"])
    for k, n in b["faults"].items():
        faults[k] = faults.get(k, 0) + n
    return {"kicks": a["kicks"] + b["kicks"], "calls": a["calls"] + b["calls"],
            "chains": a["chains"] + b["chains"], "faults": faults}


async def _recv_message(conn: Socket) -> tuple[bytes, list[int]] | None:
    """Read one whole vhost-user message and the fds sent with it."""
    header, fds = await _recv_exact(conn, HEADER_SIZE, with_fds=True)
    if header is None:
        return None
    size = int.from_bytes(header[8:12], "little")
    if size > MAX_PAYLOAD_SIZE:
        # Hand the codec the header alone: it rejects the size at once
        # instead of us waiting for gigabytes that will never come.
        return header, fds
    payload = b""
    if size:
        try:
            got, _ = await _recv_exact(conn, size, with_fds=False)
        except BaseException:
            # Cancelled (shutdown, reload) or a socket error while the
            # frontend held back the payload: the header's fds are ours.
            _close_all(fds)
            raise
        if got is None:
            _close_all(fds)
            return None
        payload = got
    return header + payload, fds


async def _recv_exact(conn: Socket, n: int, *, with_fds: bool) -> tuple[bytes | None, list[int]]:
    buf = bytearray()
    fds: list[int] = []
    while len(buf) < n:
        anc = socket.CMSG_SPACE(MAX_FDS * 4) if with_fds and not buf else 0
        try:
            data, ancdata, _flags, _ = await conn.recvmsg(n - len(buf), anc, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ECONNRESET:
                data, ancdata = b"", []
            else:
                _close_all(fds)
                raise
        fds += _fds_from(ancdata)
        if not data:
            _close_all(fds)
            return None, []
        buf += data
    return bytes(buf), fds


async def _send_all(conn: Socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send every byte; fds go with the first sendmsg (SCM_RIGHTS) and are
    closed afterwards, sent or not (they belong to the reply)."""
    view = memoryview(data)
    try:
        if fds and view:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = await conn.sendmsg([view], anc)
            view = view[sent:]
        while view:
            sent = await conn.send(view)
            view = view[sent:]
    finally:
        _close_all(list(fds))


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds += list(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
