"""Sans-IO vhost-user codec: bytes and fds in, typed requests out, replies out.

The back-end's view of one front-end connection, in the manner of h11: the
caller reads the socket and feeds :meth:`FrontendConnection.receive_data`,
then calls :meth:`FrontendConnection.next_event` until it returns
``NEED_DATA``. No socket is touched here.

Rules
-----
* A message is a 12-byte little-endian header (u32 request, u32 flags,
  u32 size) and ``size`` payload bytes (vhost-user.rst "Message
  Specification"). The header is checked as soon as it is complete, before
  its payload is waited for: unknown request, version other than 1, flag
  bits other than version and NEED_REPLY, size above ``MAX_PAYLOAD_SIZE``.
* The payload is decoded by the request's layout (``protocol.PAYLOAD_TYPES``),
  then the number of fds is checked against the whitelist
  (``protocol.allowed_fds``).
* File descriptors: Linux attaches SCM_RIGHTS fds to the first byte of the
  ``sendmsg`` that carried them, and a ``recvmsg`` on a stream socket stops
  right after the data those fds came with. So the fds passed with one
  ``receive_data`` call belong to the message that contains the *last* byte
  of that data. That holds whether the caller reads exactly one message per
  call or whatever the kernel returns.
* Ownership: every fd handed to ``receive_data`` is the codec's until it is
  returned in a :class:`Message` (then the caller's) or closed. Fds of a
  rejected message, fds left over at an error, and fds REM_MEM_REG carries
  (the spec says the back-end "MUST close it") are closed here.

States: OPEN -> (receive_data(b"")) -> EOF; any RemoteProtocolError -> ERROR;
close() -> CLOSED. In ERROR every next_event raises RemoteProtocolError
again; the caller must close the connection.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nitro.vhost.protocol import (
    FDS_TO_DISCARD,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    NEED_REPLY,
    PAYLOAD_TYPES,
    REPLY,
    VERSION,
    VERSION_MASK,
    Header,
    PayloadError,
    Request,
    allowed_fds,
)

__all__ = [
    "CLOSED", "NEED_DATA", "FrontendConnection", "LocalProtocolError", "Message",
    "ProtocolError", "RemoteProtocolError", "ReplyWithFds", "close_fds", "encode_reply",
]


class ProtocolError(Exception):
    """Base of the vhost-user errors. The session cannot go on: close it."""


class RemoteProtocolError(ProtocolError):
    """The front-end sent something invalid. The text names the request and
    why. Close the connection; the front-end may reconnect."""


class LocalProtocolError(ProtocolError):
    """nitro misused the codec (a bug here, not the front-end's fault)."""


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # next_event(): feed more bytes first
CLOSED = _Sentinel("CLOSED")        # next_event(): the front-end closed cleanly


@dataclass
class Message:
    """One decoded front-end request. ``fds`` are owned by whoever holds it."""

    request: Request
    flags: int = VERSION
    payload: Any = None
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    def encode(self) -> bytes:
        """Wire bytes (without the fds), as a front-end would send them."""
        body = b"" if self.payload is None else self.payload.encode()
        return Header(int(self.request), self.flags, len(body)).encode() + body


class ReplyWithFds(bytes):
    """Reply bytes that go out with file descriptors (GET_INFLIGHT_FD's
    shared buffer), attached as SCM_RIGHTS to the reply's first byte.

    It is the bytes of the reply, so code that only sends bytes still works;
    ``fds`` belong to the reply: whoever sends it closes them once sent, or
    closes them if it never sends."""

    fds: tuple[int, ...]

    def __new__(cls, data: bytes, fds: Iterable[int]) -> ReplyWithFds:
        self = super().__new__(cls, data)
        self.fds = tuple(fds)
        return self


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def encode_reply(request: Request, payload: object) -> bytes:
    """A back-end reply: header with VERSION | REPLY, then the payload
    (``bytes`` or an object with ``encode()``)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        body = bytes(payload)
    elif hasattr(payload, "encode"):
        body = payload.encode()
    else:
        raise LocalProtocolError(f"{request.name}: cannot send a {type(payload).__name__} as a reply")
    if len(body) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{request.name}: reply of {len(body)} bytes is too large")
    return Header(int(request), VERSION | REPLY, len(body)).encode() + body


def _check_header(header: Header) -> Request:
    try:
        request = Request(header.request)
    except ValueError:
        raise RemoteProtocolError(f"unknown request {header.request}") from None
    name = request.name
    if header.flags & VERSION_MASK != VERSION:
        raise RemoteProtocolError(
            f"{name}: unsupported version {header.flags & VERSION_MASK} (flags 0x{header.flags:x})")
    extra = header.flags & ~(VERSION_MASK | NEED_REPLY)
    if extra:
        raise RemoteProtocolError(f"{name}: unexpected flag bits 0x{extra:x} in a request")
    if header.size > MAX_PAYLOAD_SIZE:
        raise RemoteProtocolError(
            f"{name}: payload size {header.size} exceeds the {MAX_PAYLOAD_SIZE}-byte limit")
    return request


def _decode_payload(request: Request, body: bytes) -> object:
    kind = PAYLOAD_TYPES[request]
    if kind is None:
        if body:
            raise RemoteProtocolError(f"{request.name}: takes no payload, got {len(body)} bytes")
        return None
    try:
        return kind.decode(body)
    except PayloadError as e:
        raise RemoteProtocolError(f"{request.name}: bad payload: {e}") from None


def _check_fds(request: Request, payload: object, fds: list[int]) -> None:
    allowed = allowed_fds(request, payload)
    if len(fds) not in allowed:
        want = str(allowed.start) if len(allowed) == 1 else f"{allowed.start} to {allowed.stop - 1}"
        raise RemoteProtocolError(
            f"{request.name}: {len(fds)} file descriptors attached, expected {want}")


class FrontendConnection:
    """The back-end's side of one vhost-user connection (sans-IO)."""

    def __init__(self) -> None:
        self.state = "OPEN"
        self._buffer = bytearray()
        self._consumed = 0          # stream offset of _buffer[0]
        self._received = 0          # stream offset just past the last byte received
        self._chunks: deque[tuple[int, list[int]]] = deque()  # (end offset, fds)
        self._request: Request | None = None  # checked header of the message in progress
        self._header: Header | None = None

    # -- input -------------------------------------------------------------
    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Feed bytes read from the socket and the fds that came with them.
        ``data == b""`` means end of stream (fds with it are closed)."""
        fds = list(fds)
        if self.state != "OPEN":
            close_fds(fds)
            raise LocalProtocolError(f"receive_data() in state {self.state}")
        if not data:
            close_fds(fds)
            self.state = "EOF"
            return
        self._buffer += data
        self._received += len(data)
        if fds:
            self._chunks.append((self._received, fds))

    # -- output ------------------------------------------------------------
    def next_event(self) -> Message | _Sentinel:
        """The next complete request, NEED_DATA, or CLOSED after a clean EOF.
        Raises RemoteProtocolError (fds of the message closed) on bad input."""
        if self.state in ("ERROR", "CLOSED"):
            raise RemoteProtocolError(f"connection is in state {self.state} after an earlier error")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._fail()
            raise

    def reply(self, message: Message, payload: object) -> bytes:
        """Bytes of the reply to ``message`` (REPLY flag set)."""
        return encode_reply(message.request, payload)

    def close(self) -> None:
        """Close every fd still held; the connection is unusable afterwards."""
        self._drop_everything()
        self.state = "CLOSED"

    # -- internals -----------------------------------------------------------
    def _next_event(self) -> Message | _Sentinel:
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return self._need_data()
            header = Header.decode(bytes(self._buffer[:HEADER_SIZE]))
            self._request = _check_header(header)
            self._header = header
        total = HEADER_SIZE + self._header.size
        if len(self._buffer) < total:
            return self._need_data()
        body = bytes(self._buffer[HEADER_SIZE:total])
        del self._buffer[:total]
        self._consumed += total
        flags, request = self._header.flags, self._request
        assert request is not None  # set together with _header
        self._header = self._request = None
        return self._build(request, flags, body, self._take_fds(self._consumed))

    def _need_data(self) -> _Sentinel:
        if self.state != "EOF":
            return NEED_DATA
        if self._buffer:
            raise RemoteProtocolError(
                f"connection closed in the middle of a message ({len(self._buffer)} bytes pending)")
        return CLOSED

    def _take_fds(self, end: int) -> list[int]:
        """The fds of every chunk whose last byte lies in the message ending at ``end``."""
        fds: list[int] = []
        while self._chunks and self._chunks[0][0] <= end:
            fds += self._chunks.popleft()[1]
        return fds

    def _build(self, request: Request, flags: int, body: bytes, fds: list[int]) -> Message:
        try:
            payload = _decode_payload(request, body)
            _check_fds(request, payload, fds)
        except RemoteProtocolError:
            close_fds(fds)
            raise
        if request in FDS_TO_DISCARD:
            close_fds(fds)
            fds = []
        return Message(request, flags, payload, fds)

    def _fail(self) -> None:
        self._drop_everything()
        self.state = "ERROR"

    def _drop_everything(self) -> None:
        while self._chunks:
            close_fds(self._chunks.popleft()[1])
        self._buffer.clear()
        self._header = self._request = None
