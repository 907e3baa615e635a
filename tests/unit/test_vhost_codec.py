"""The sans-IO vhost-user codec: framing, payload layouts, fd attribution, errors."""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nitro.vhost.codec import (
    CLOSED,
    NEED_DATA,
    FrontendConnection,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    encode_reply,
)
from nitro.vhost.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    NEED_REPLY,
    PAYLOAD_TYPES,
    REPLY,
    U64,
    VERSION,
    DeviceConfig,
    Header,
    Inflight,
    MemoryRegion,
    MemoryTable,
    Opaque,
    PayloadError,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFd,
    VringState,
    allowed_fds,
)

R = Request
REGION_A = MemoryRegion(0x0, 0xA0000, 0x7F0000000000, 0)
REGION_B = MemoryRegion(0x100000, 0xFF00000, 0x7F0000100000, 0x100000)

# One well-formed example of every front-end request: (payload, number of fds).
SAMPLES: dict[Request, tuple[object, int]] = {
    R.GET_FEATURES: (None, 0),
    R.SET_FEATURES: (U64(1 << 32 | 1 << 30 | 1 << 29), 0),
    R.SET_OWNER: (None, 0),
    R.RESET_OWNER: (None, 0),
    R.SET_MEM_TABLE: (MemoryTable((REGION_A, REGION_B)), 2),
    R.SET_LOG_BASE: (Opaque(struct.pack("<QQ", 4096, 0)), 1),
    R.SET_LOG_FD: (None, 1),
    R.SET_VRING_NUM: (VringState(0, 256), 0),
    R.SET_VRING_ADDR: (VringAddr(1, 0, 0x7F0000001000, 0x7F0000003000, 0x7F0000002000, 0), 0),
    R.SET_VRING_BASE: (VringState(1, 7), 0),
    R.GET_VRING_BASE: (VringState(1, 0), 0),
    R.SET_VRING_KICK: (VringFd(1), 1),
    R.SET_VRING_CALL: (VringFd(0, invalid=True), 0),
    R.SET_VRING_ERR: (VringFd(255), 1),
    R.GET_PROTOCOL_FEATURES: (None, 0),
    R.SET_PROTOCOL_FEATURES: (U64(int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)), 0),
    R.GET_QUEUE_NUM: (None, 0),
    R.SET_VRING_ENABLE: (VringState(0, 1), 0),
    R.SEND_RARP: (U64(0x5254_0012_3456), 0),
    R.NET_SET_MTU: (U64(1500), 0),
    R.SET_BACKEND_REQ_FD: (None, 1),
    R.IOTLB_MSG: (Opaque(bytes(32)), 0),
    R.SET_VRING_ENDIAN: (VringState(0, 0), 0),
    R.GET_CONFIG: (DeviceConfig(0, 60, 0, bytes(60)), 0),
    R.SET_CONFIG: (DeviceConfig(0x20, 1, 0, b"\x01"), 0),
    R.CREATE_CRYPTO_SESSION: (Opaque(b"session"), 0),
    R.CLOSE_CRYPTO_SESSION: (U64(3), 0),
    R.POSTCOPY_ADVISE: (None, 0),
    R.POSTCOPY_LISTEN: (None, 0),
    R.POSTCOPY_END: (None, 0),
    R.GET_INFLIGHT_FD: (Inflight(0, 0, 2, 128), 0),
    R.SET_INFLIGHT_FD: (Inflight(4224, 0, 2, 128), 1),
    R.GPU_SET_SOCKET: (None, 1),
    R.RESET_DEVICE: (None, 0),
    R.VRING_KICK: (VringState(0, 0), 0),
    R.GET_MAX_MEM_SLOTS: (None, 0),
    R.ADD_MEM_REG: (SingleMemoryRegion(0x100000000, 0x10000000, 0x7F1000000000, 0), 1),
    R.REM_MEM_REG: (SingleMemoryRegion(0x100000000, 0x10000000, 0x7F1000000000, 0), 0),
    R.SET_STATUS: (U64(0xF), 0),
    R.GET_STATUS: (None, 0),
}


_INODES: dict[int, int] = {}  # fd -> inode of the memfd new_fds last gave that number


def new_fds(n: int) -> list[int]:
    """Distinct real fds: memfds, each with its own inode, so a test can tell
    "closed" from "closed and the number reused"."""
    fds = [os.memfd_create(f"nitro-test-{i}") for i in range(n)]
    for fd in fds:
        _INODES[fd] = os.fstat(fd).st_ino
    return fds


def assert_closed(fds: list[int]) -> None:
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def close_if_ours(fd: int) -> None:
    """Close fd unless the codec already did (its number may be reused by now)."""
    try:
        if os.fstat(fd).st_ino == _INODES.get(fd):
            os.close(fd)
    except OSError:
        pass


@contextmanager
def owned(fds: list[int]):
    """At the end, close whatever of ``fds`` (from new_fds; may grow inside) is still ours."""
    try:
        yield fds
    finally:
        for fd in fds:
            close_if_ours(fd)


def feed(codec: FrontendConnection, data: bytes, fds=()) -> list[Message]:
    codec.receive_data(data, fds)
    out = []
    while (event := codec.next_event()) is not NEED_DATA:
        assert event is not CLOSED
        out.append(event)
    return out


def header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


# -- vocabulary ---------------------------------------------------------------------
def test_samples_cover_every_request_and_numbers_match_the_spec():
    assert set(SAMPLES) == set(Request) == set(PAYLOAD_TYPES)
    assert [r.value for r in Request] == list(range(1, 41))
    assert (R.SET_VRING_ENABLE, R.GET_CONFIG, R.SET_CONFIG, R.GET_INFLIGHT_FD) == (18, 24, 25, 31)
    assert (R.SET_INFLIGHT_FD, R.RESET_DEVICE, R.GET_MAX_MEM_SLOTS) == (32, 34, 36)
    assert (R.ADD_MEM_REG, R.REM_MEM_REG, R.SET_STATUS, R.GET_STATUS) == (37, 38, 39, 40)
    assert R.SET_SLAVE_REQ_FD is R.SET_BACKEND_REQ_FD
    assert ProtocolFeature.SLAVE_REQ is ProtocolFeature.BACKEND_REQ == 1 << 5
    assert ProtocolFeature.SLAVE_SEND_FD is ProtocolFeature.BACKEND_SEND_FD == 1 << 10
    assert ProtocolFeature.REPLY_ACK == 1 << 3 and ProtocolFeature.CONFIG == 1 << 9
    assert ProtocolFeature.INFLIGHT_SHMFD == 1 << 12
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15 and ProtocolFeature.STATUS == 1 << 16


@pytest.mark.parametrize("request_", list(Request), ids=lambda r: r.name)
def test_every_request_round_trips(request_):
    payload, nfds = SAMPLES[request_]
    flags = VERSION | NEED_REPLY
    codec = FrontendConnection()
    with owned(new_fds(nfds)) as fds:
        [msg] = feed(codec, Message(request_, flags, payload).encode(), fds)
        assert (msg.request, msg.flags, msg.payload) == (request_, flags, payload)
        assert msg.need_reply
        if request_ is R.REM_MEM_REG:
            assert msg.fds == []
        else:
            assert msg.fds == fds
        assert msg.encode() == Message(request_, flags, payload).encode()


def test_layout_sizes_match_the_spec():
    assert len(VringState(0, 0).encode()) == 8
    assert len(VringAddr(0, 0, 0, 0, 0, 0).encode()) == 40
    assert len(MemoryTable(()).encode()) == 8
    assert len(MemoryTable((REGION_A,) * 8).encode()) == 8 + 8 * 32
    assert len(SingleMemoryRegion(1, 2, 3, 4).encode()) == 40
    assert SingleMemoryRegion(1, 2, 3, 4).encode()[:8] == bytes(8)  # leading padding
    assert len(DeviceConfig(0, 4, 0, b"abcd").encode()) == 16
    assert VringFd(3, invalid=True).encode() == struct.pack("<Q", 0x103)
    assert Header(1, VERSION, 0).encode() == bytes([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(MemoryRegion, u64, u64, u64, u64)
payloads = st.one_of(
    st.builds(U64, u64),
    st.builds(VringState, u32, u32),
    st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    st.builds(VringFd, st.integers(0, 255), st.booleans()),
    st.builds(MemoryTable, st.lists(regions, max_size=8).map(tuple)),
    st.builds(SingleMemoryRegion, u64, u64, u64, u64),
    st.binary(max_size=64).flatmap(
        lambda b: st.builds(DeviceConfig, u32, st.just(len(b)), u32, st.just(b))),
)


@given(payloads)
def test_payload_layouts_round_trip(payload):
    assert type(payload).decode(payload.encode()) == payload


def test_memory_table_refuses_to_encode_more_than_eight_regions():
    with pytest.raises(ValueError):
        MemoryTable((REGION_A,) * 9).encode()


# -- framing --------------------------------------------------------------------------
def sample_stream() -> list[tuple[Message, int]]:
    return [(Message(r, VERSION, p), n) for r, (p, n) in SAMPLES.items()]


def test_byte_by_byte_with_fds_on_each_first_byte():
    codec = FrontendConnection()
    got: list[Message] = []
    with owned([]) as all_fds:
        for msg, nfds in sample_stream():
            data = msg.encode()
            fds = new_fds(nfds)
            all_fds += fds
            for i in range(len(data)):
                got += feed(codec, data[i:i + 1], fds if i == 0 else ())
            assert got[-1].request is msg.request
            assert got[-1].payload == msg.payload
            assert got[-1].fds == ([] if msg.request is R.REM_MEM_REG else fds)
        assert len(got) == len(SAMPLES)


def test_header_then_payload_reads_like_the_trio_layer():
    codec = FrontendConnection()
    msg = Message(R.SET_MEM_TABLE, VERSION, MemoryTable((REGION_A, REGION_B)))
    data = msg.encode()
    with owned(new_fds(2)) as fds:
        assert feed(codec, data[:HEADER_SIZE], fds) == []
        [got] = feed(codec, data[HEADER_SIZE:])
        assert got.fds == fds


def test_many_messages_in_one_read_give_the_fds_to_the_one_holding_the_last_byte():
    # recvmsg stops right after the data that carried fds: a read holding
    # NUM, BASE, ADDR and KICK carries KICK's fd.
    codec = FrontendConnection()
    batch = [Message(R.SET_VRING_NUM, VERSION, VringState(0, 128)),
             Message(R.SET_VRING_BASE, VERSION, VringState(0, 0)),
             Message(R.SET_VRING_ADDR, VERSION, VringAddr(0, 0, 1, 2, 3, 0)),
             Message(R.SET_VRING_KICK, VERSION, VringFd(0))]
    with owned(new_fds(1)) as fds:
        got = feed(codec, b"".join(m.encode() for m in batch), fds)
        assert [m.request for m in got] == [m.request for m in batch]
        assert [m.fds for m in got] == [[], [], [], fds]


def test_fds_with_a_read_that_starts_mid_message_go_to_the_next_message():
    codec = FrontendConnection()
    a = Message(R.SET_VRING_NUM, VERSION, VringState(0, 128)).encode()
    b = Message(R.SET_VRING_CALL, VERSION, VringFd(0)).encode()
    with owned(new_fds(1)) as fds:
        assert feed(codec, a[:5]) == []
        got = feed(codec, a[5:] + b[:3], fds)
        assert [m.request for m in got] == [R.SET_VRING_NUM] and got[0].fds == []
        [call] = feed(codec, b[3:])
        assert call.fds == fds


def test_eof_after_whole_messages_is_closed_and_mid_message_is_an_error():
    codec = FrontendConnection()
    feed(codec, Message(R.GET_FEATURES).encode())
    codec.receive_data(b"")
    assert codec.next_event() is CLOSED

    codec = FrontendConnection()
    with owned(new_fds(1)) as fds:
        codec.receive_data(Message(R.SET_VRING_KICK, VERSION, VringFd(0)).encode()[:14], fds)
        assert codec.next_event() is NEED_DATA
        codec.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="middle of a message"):
            codec.next_event()
        assert_closed(fds)


def test_close_closes_fds_not_yet_handed_out():
    codec = FrontendConnection()
    with owned(new_fds(2)) as fds:
        data = Message(R.SET_MEM_TABLE, VERSION, MemoryTable((REGION_A, REGION_B))).encode()
        codec.receive_data(data[:20], fds)
        assert codec.next_event() is NEED_DATA
        codec.close()
        assert_closed(fds)
    with pytest.raises(LocalProtocolError):
        codec.receive_data(b"x")


def test_rem_mem_reg_fd_is_closed_by_the_codec():
    codec = FrontendConnection()
    payload, _ = SAMPLES[R.REM_MEM_REG]
    with owned(new_fds(1)) as fds:
        [msg] = feed(codec, Message(R.REM_MEM_REG, VERSION, payload).encode(), fds)
        assert msg.fds == []
        assert_closed(fds)


def test_reply_sets_the_reply_flag():
    codec = FrontendConnection()
    [msg] = feed(codec, Message(R.GET_FEATURES, VERSION | NEED_REPLY).encode())
    data = codec.reply(msg, U64(0x1234))
    assert Header.decode(data[:12]) == Header(R.GET_FEATURES, VERSION | REPLY, 8)
    assert U64.decode(data[12:]) == U64(0x1234)
    assert encode_reply(R.GET_CONFIG, b"") == header(R.GET_CONFIG, VERSION | REPLY, 0)
    with pytest.raises(LocalProtocolError):
        codec.reply(msg, 42)
    with pytest.raises(LocalProtocolError):
        codec.reply(msg, bytes(MAX_PAYLOAD_SIZE + 1))


# -- malformed input --------------------------------------------------------------------
def kick() -> bytes:
    return Message(R.SET_VRING_KICK, VERSION, VringFd(0)).encode()


MALFORMED = {
    "version 0": (header(R.SET_VRING_KICK, 0, 8) + bytes(8), 1, "SET_VRING_KICK: unsupported version 0"),
    "version 2": (header(R.SET_VRING_KICK, 2, 8) + bytes(8), 1, "unsupported version 2"),
    "reply flag": (header(R.SET_VRING_KICK, VERSION | REPLY, 8) + bytes(8), 1, "unexpected flag bits 0x4"),
    "oversized": (header(R.SET_VRING_KICK, VERSION, MAX_PAYLOAD_SIZE + 1), 1,
                  "SET_VRING_KICK: payload size 4097 exceeds"),
    "unknown request": (header(99, VERSION, 0), 1, "unknown request 99"),
    "request 0": (header(0, VERSION, 0), 0, "unknown request 0"),
    "truncated u64": (header(R.SET_VRING_KICK, VERSION, 4) + bytes(4), 1,
                      "SET_VRING_KICK: bad payload: a vring fd payload is 8 bytes, got 4"),
    "long u64": (header(R.SET_FEATURES, VERSION, 9) + bytes(9), 0, "SET_FEATURES: bad payload"),
    "payload on N/A": (header(R.GET_FEATURES, VERSION, 8) + bytes(8), 0, "GET_FEATURES: takes no payload"),
    "reserved kick bits": (header(R.SET_VRING_KICK, VERSION, 8) + struct.pack("<Q", 0x200), 1,
                           "reserved bits 0x200"),
    "kick without fd": (kick(), 0, "SET_VRING_KICK: 0 file descriptors attached, expected 1"),
    "two kick fds": (kick(), 2, "SET_VRING_KICK: 2 file descriptors attached, expected 1"),
    "fd with nofd kick": (Message(R.SET_VRING_KICK, VERSION, VringFd(0, True)).encode(), 1,
                          "expected 0"),
    "fd on SET_VRING_NUM": (Message(R.SET_VRING_NUM, VERSION, VringState(0, 8)).encode(), 1,
                            "SET_VRING_NUM: 1 file descriptors attached, expected 0"),
    "mem table fd count": (Message(R.SET_MEM_TABLE, VERSION, MemoryTable((REGION_A, REGION_B))).encode(),
                           1, "SET_MEM_TABLE: 1 file descriptors attached, expected 2"),
    "nine regions": (header(R.SET_MEM_TABLE, VERSION, 8 + 9 * 32) + struct.pack("<II", 9, 0)
                     + REGION_A.encode() * 9, 9, "SET_MEM_TABLE: bad payload: 9 regions, at most 8"),
    "region count mismatch": (header(R.SET_MEM_TABLE, VERSION, 8 + 32) + struct.pack("<II", 2, 0)
                              + REGION_A.encode(), 2, "memory regions description of 2 regions is 72"),
    "config size mismatch": (header(R.GET_CONFIG, VERSION, 12 + 4) + struct.pack("<III", 0, 8, 0)
                             + bytes(4), 0, "GET_CONFIG: bad payload"),
    "short config": (header(R.SET_CONFIG, VERSION, 4) + bytes(4), 0, "SET_CONFIG: bad payload"),
    "short addr": (header(R.SET_VRING_ADDR, VERSION, 32) + bytes(32), 0,
                   "SET_VRING_ADDR: bad payload: a vring address description is 40 bytes"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_a_remote_error_and_closes_the_fds(case):
    data, nfds, text = MALFORMED[case]
    codec = FrontendConnection()
    with owned(new_fds(nfds)) as fds:
        codec.receive_data(data, fds)
        with pytest.raises(RemoteProtocolError, match=text.replace("(", r"\(").replace(")", r"\)")):
            codec.next_event()
        assert_closed(fds)
    with pytest.raises(RemoteProtocolError, match="ERROR"):
        codec.next_event()


def test_header_errors_do_not_wait_for_the_payload():
    codec = FrontendConnection()
    codec.receive_data(header(R.SET_CONFIG, VERSION, 2**32 - 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        codec.next_event()


@pytest.mark.parametrize(
    "request_", [r for r in Request if PAYLOAD_TYPES[r] not in (Opaque,)], ids=lambda r: r.name)
def test_a_payload_one_byte_too_long_is_rejected_naming_the_request(request_):
    payload, nfds = SAMPLES[request_]
    body = (b"" if payload is None else payload.encode()) + b"\0"
    codec = FrontendConnection()
    with owned(new_fds(nfds)) as fds:
        codec.receive_data(header(request_, VERSION, len(body)) + body, fds)
        with pytest.raises(RemoteProtocolError, match=request_.name):
            codec.next_event()
        assert_closed(fds)


def test_good_messages_before_a_bad_one_are_delivered():
    codec = FrontendConnection()
    codec.receive_data(Message(R.GET_FEATURES).encode() + header(77, VERSION, 0))
    assert codec.next_event().request is R.GET_FEATURES
    with pytest.raises(RemoteProtocolError, match="unknown request 77"):
        codec.next_event()


# -- fuzzing ------------------------------------------------------------------------------
def _valid_request_ids():
    return st.sampled_from([int(r) for r in Request])


frames = st.one_of(
    st.binary(max_size=64),
    st.tuples(_valid_request_ids(), st.sampled_from([VERSION, VERSION | NEED_REPLY, 0, 3, 0x11]),
              st.binary(max_size=300)).map(lambda t: header(t[0], t[1], len(t[2])) + t[2]),
    st.tuples(_valid_request_ids(), st.binary(max_size=48), st.integers(0, 64)).map(
        lambda t: header(t[0], VERSION, len(t[1]) + t[2]) + t[1]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(frames, st.integers(0, 2)), max_size=6), st.booleans())
def test_random_input_gives_messages_or_remote_errors_and_never_leaks_fds(chunks, eof):
    codec = FrontendConnection()
    made: list[tuple[int, int]] = []       # (fd, inode) handed to the codec
    delivered: set[int] = set()
    try:
        for data, nfds in chunks:
            if not data:
                continue  # b"" means end of stream; that is the eof flag's job
            fds = new_fds(nfds)
            made += [(fd, os.fstat(fd).st_ino) for fd in fds]
            codec.receive_data(data, fds)
            while (event := codec.next_event()) is not NEED_DATA:
                assert isinstance(event, Message)
                assert len(event.fds) in allowed_fds(event.request, event.payload)
                delivered.update(event.fds)
        if eof:
            codec.receive_data(b"")
            while (event := codec.next_event()) is not CLOSED:
                assert isinstance(event, Message)
                delivered.update(event.fds)
    except RemoteProtocolError as e:
        assert str(e)
    finally:
        codec.close()
    for fd, inode in made:
        if fd in delivered:
            assert os.fstat(fd).st_ino == inode
            os.close(fd)
        else:
            try:
                assert os.fstat(fd).st_ino != inode, "fd leaked"
            except OSError:
                pass


@settings(max_examples=100)
@given(st.lists(st.sampled_from(list(Request)), min_size=1, max_size=12), st.data())
def test_valid_streams_split_anywhere_decode_to_the_same_messages(requests, data):
    sent = [(Message(r, VERSION, SAMPLES[r][0]), SAMPLES[r][1]) for r in requests]
    codec = FrontendConnection()
    got: list[Message] = []
    opened: list[int] = []
    try:
        for msg, nfds in sent:
            wire = msg.encode()
            cut = data.draw(st.integers(1, len(wire)))
            fds = new_fds(nfds)
            opened += fds
            got += feed(codec, wire[:cut], fds)
            got += feed(codec, wire[cut:]) if cut < len(wire) else []
        assert [(m.request, m.payload) for m in got] == [(m.request, m.payload) for m, _ in sent]
        assert [len(m.fds) for m in got] == [
            0 if m.request is R.REM_MEM_REG else n for m, n in sent]
    finally:
        codec.close()
        for fd in opened:
            close_if_ours(fd)


def test_payload_error_is_a_value_error():
    with pytest.raises(PayloadError):
        VringState.decode(b"1234")
    assert issubclass(PayloadError, ValueError)


def test_inflight_description_sizes():
    """QEMU sends its padded 24-byte struct; 20 unpadded bytes are fine too."""
    info = Inflight(4224, 0, 2, 128)
    assert len(info.encode()) == 24
    assert Inflight.decode(info.encode()) == info
    assert Inflight.decode(info.encode()[:20]) == info
    for bad in (16, 21, 32):
        with pytest.raises(PayloadError, match="inflight description is 24 bytes"):
            Inflight.decode(bytes(bad))
