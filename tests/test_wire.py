"""The sans-I/O wire protocol (``shared.wire``): codec, limits, state machine.

No sockets: messages move between a client and a server ``Connection``
directly, or over ``trio.testing`` memory / lockstep stream pairs.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.shared import abi, wire
from pvemu.shared.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    WireErrorCode,
)
from pvemu.shared.wire import (
    CONNECTION_CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Access,
    Audit,
    AuditResult,
    Bye,
    Call,
    Connection,
    ErrorReply,
    Fault,
    Goodbye,
    Hello,
    Hypercall,
    Join,
    KernelWrite,
    KernelWriteResult,
    Message,
    MmuextOpArgs,
    MmuUpdateArgs,
    MulticallArgs,
    MulticallResult,
    Ptwr,
    PtwrResult,
    RawArgs,
    Reply,
    Request,
    Result,
    RunUser,
    State,
    Stats,
    StatsResult,
    UpdateVaMappingArgs,
    UpdateVaMappingOtherdomainArgs,
    UserResult,
    VmAssistArgs,
    Welcome,
    make_call,
    pack_mmu_updates,
    pack_u64s,
    unpack_mmu_updates,
    unpack_u64s,
)

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
SECRET = bytes(range(16))
NX_PTE = (1 << 63) | 0x1234_5000 | 0x67  # NX set: a 9-byte msgpack uint64

HELLO = Hello(0, PROTOCOL_VERSION, 16, 2, "guest")
WELCOME = Welcome(
    0,
    domid=1,
    vcpu=0,
    nr_frames=4,
    secret=SECRET,
    limits={"max_mmu_updates": wire.MAX_MMU_UPDATES, "quantum": 64},
    features=(abi.XENFEAT_mmu_pt_update_preserve_ad,),
)

MULTICALL = Hypercall.make(
    7,
    abi.HYPERVISOR_multicall,
    [
        (abi.HYPERVISOR_mmu_update, [(0x2000, NX_PTE), (0x2008, 0)], abi.DOMID_SELF),
        (abi.HYPERVISOR_update_va_mapping, 0x40_0000, 0x1067, abi.UVMF_INVLPG),
        (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)]),
        (abi.HYPERVISOR_vm_assist, abi.VMASST_CMD_enable, abi.VMASST_TYPE_m2p_strict),
        (abi.HYPERVISOR_multicall, [(abi.HYPERVISOR_vm_assist, 0, 2)]),  # nested: -EINVAL
        (abi.HYPERVISOR_set_timer_op, 5),  # unknown: -ENOSYS
    ],
)

#: Every request (after HELLO), in an order a session may send them.
REQUESTS: list[Request] = [
    Hypercall.make(
        3,
        abi.HYPERVISOR_mmu_update,
        [(0x1000 | abi.MMU_NORMAL_PT_UPDATE, NX_PTE), (0x1008 | abi.MMU_PT_UPDATE_PRESERVE_AD, 7)],
        abi.DOMID_SELF,
    ),
    Hypercall.make(4, abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_PIN_L4_TABLE, 42, 0)], 0),
    Hypercall.make(5, abi.HYPERVISOR_update_va_mapping, U64, NX_PTE, abi.UVMF_TLB_FLUSH),
    Hypercall.make(6, abi.HYPERVISOR_vm_assist, 0, abi.VMASST_TYPE_writable_pagetables),
    MULTICALL,
    Hypercall.make(8, 99, 1, 2, U64),
    Hypercall.make(9, abi.HYPERVISOR_xen_version),
    Ptwr(10, 0x5008, NX_PTE, exchange=True),
    RunUser(11, (Access(0x1000, "r", 8), Access(0x2000, "w", b"hi"), Access(0x3000, "x", 1))),
    Stats(12),
    Audit(13),
    Ptwr(14, 0x5010, 0, clear_bits=0x2),
    KernelWrite(15, 0x6FF8, b"12345678"),
]

#: A valid reply for each request in REQUESTS, same order.
REPLIES: list[Reply] = [
    Result(3, 0, 2),
    Result(4, -abi.EINVAL, 0),
    Result(5, 0),
    Result(6, 0),
    MulticallResult(7, 0, (0, 0, 0, 0, -abi.EINVAL, -abi.ENOSYS)),
    Result(8, -abi.ENOSYS),
    ErrorReply(9, WireErrorCode.NOT_SUPPORTED, "no"),
    PtwrResult(10, 0, U64),
    UserResult(11, 2, (b"12345678",), Fault(0x3000, 0x15)),
    StatsResult(12, {"guest": {"traps": 3}, "hypervisor": {"traps": 3, "ops": {"mmu_update": 1}}}),
    AuditResult(13, ("frame 7: type count 2, expected 1",)),
    PtwrResult(14, 0, 0x67),
    KernelWriteResult(15, -abi.EFAULT),
]


def packb(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, use_list=False, strict_map_key=True)


def codec_round_trip(message: Message) -> Message:
    return type(message).from_wire(unpackb(packb(message.to_wire())))


def ready_pair(**kwargs: int) -> tuple[Connection, Connection]:
    """A client and a server that have done hello/welcome."""
    client, server = Connection("client", **kwargs), Connection("server", **kwargs)
    server.receive_data(client.send(HELLO))
    assert server.next_event() == HELLO
    client.receive_data(server.send(WELCOME))
    assert client.next_event() == WELCOME
    assert state_of(client) is state_of(server) is State.READY
    return client, server


def ready_server(**kwargs: int) -> Connection:
    return ready_pair(**kwargs)[1]


def client_awaiting(request: Request) -> Connection:
    """A client that sent ``request`` and waits for its reply."""
    client = Connection("client") if isinstance(request, Hello | Join) else ready_pair()[0]
    client.send(request)
    return client


def state_of(conn: Connection) -> State:
    """``conn.state`` without mypy narrowing it across assertions."""
    return conn.state


def feed_one(conn: Connection, data: bytes) -> Message:
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, Message), event
    assert conn.next_event() is NEED_DATA
    return event


def rejected(conn: Connection, data: bytes) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    return info.value


def drain(conn: Connection) -> list[Message]:
    out = []
    while isinstance(event := conn.next_event(), Message):
        out.append(event)
    return out


# --- round trips --------------------------------------------------------------------


@pytest.mark.parametrize(
    "message", [HELLO, WELCOME, Join(2, wire.PROTOCOL_VERSION, 7, SECRET, 3), *REQUESTS, *REPLIES]
)
def test_codec_round_trip(message: Message) -> None:
    assert codec_round_trip(message) == message


def test_session_round_trip_through_connections() -> None:
    client, server = ready_pair()
    for request, reply in zip(REQUESTS, REPLIES, strict=True):
        assert feed_one(server, client.send(request)) == request
        assert feed_one(client, server.send(reply)) == reply
    assert not client.pending_ids
    assert not server.pending_ids
    assert feed_one(server, client.send(Bye(99))) == Bye(99)
    assert state_of(client) is state_of(server) is State.CLOSING
    assert feed_one(client, server.send(Goodbye(99))) == Goodbye(99)
    assert state_of(client) is state_of(server) is State.CLOSED
    client.receive_data(b"")
    server.receive_data(b"")
    assert client.next_event() is CONNECTION_CLOSED
    assert server.next_event() is CONNECTION_CLOSED
    assert server.next_event() is CONNECTION_CLOSED  # idempotent


def test_join_handshake() -> None:
    client, server = Connection("client"), Connection("server")
    join = Join(5, PROTOCOL_VERSION, 1, SECRET, 1)
    assert feed_one(server, client.send(join)) == join
    welcome = Welcome(5, 1, 1, WELCOME.nr_frames, SECRET, {}, ())
    assert feed_one(client, server.send(welcome)) == welcome
    assert state_of(client) is state_of(server) is State.READY


def test_decoded_forms_are_typed_and_cheap() -> None:
    _client, server = ready_pair()
    mmu = feed_one(server, packb(REQUESTS[0].to_wire()))
    assert isinstance(mmu, Hypercall)
    assert isinstance(mmu.args, MmuUpdateArgs)
    assert type(mmu.args.reqs) is bytes  # stays a blob until the hypervisor parses it
    assert mmu.args.count == 2
    assert mmu.args.pairs() == [(0x1000, NX_PTE), (0x100A, 7)]
    multi = feed_one(server, packb(MULTICALL.to_wire()))
    assert isinstance(multi, Hypercall)
    assert isinstance(multi.args, MulticallArgs)
    kinds = [type(call.args) for call in multi.args.calls]
    assert kinds == [
        MmuUpdateArgs,
        UpdateVaMappingArgs,
        MmuextOpArgs,
        VmAssistArgs,
        MulticallArgs,
        RawArgs,
    ]
    run = feed_one(server, packb(REQUESTS[8].to_wire()))
    assert isinstance(run, RunUser)
    assert run.accesses[1].kind == "w"
    assert run.accesses[1].data == b"hi"


def test_pt_owner_foreigndom_and_otherdomain_decode_typed() -> None:
    """What a raw client sends: a foreigndom with the page-table owner in bits
    16-31 (docs/sources.md §6) and hypercall 22 arrive typed and intact, at top
    level and inside a multicall."""
    server = ready_server()
    pfd = (7 + 1) << 16 | abi.DOMID_SELF

    def call(rid: int, op: int, args: list[object]) -> Hypercall:
        message = feed_one(server, packb({"t": "hypercall", "id": rid, "op": op, "args": args}))
        assert isinstance(message, Hypercall)
        return message

    assert call(1, 1, [b"", pfd]).args == MmuUpdateArgs(b"", pfd)
    assert call(2, 26, [[], pfd]).args == MmuextOpArgs((), pfd)
    uvm = [0x5000, NX_PTE, abi.UVMF_INVLPG, abi.DOMID_SELF]
    other = UpdateVaMappingOtherdomainArgs(0x5000, NX_PTE, abi.UVMF_INVLPG, abi.DOMID_SELF)
    assert call(3, 22, uvm).args == other
    multi = call(4, 13, [[[22, *uvm], [1, b"", pfd]]]).args
    assert multi == MulticallArgs((Call(22, other), Call(1, MmuUpdateArgs(b"", pfd))))


def test_plain_tuples_become_named_tuples() -> None:
    run = RunUser(1, ((0x1000, "r", 8),))  # type: ignore[arg-type]
    assert isinstance(run.accesses[0], Access)
    assert run.accesses[0].va == 0x1000
    assert run == RunUser(1, (Access(0x1000, "r", 8),))
    result = UserResult(1, 0, (), (5, 6))  # type: ignore[arg-type]
    assert isinstance(result.fault, Fault)


def test_run_user_resume_is_optional_on_the_wire() -> None:
    """``resume`` is only encoded when true, and a map without it (any
    guest written before the field) decodes as a plain run."""
    plain, resuming = RunUser(1, ()), RunUser(2, (), resume=True)
    assert plain.to_wire() == {"t": "run_user", "id": 1, "accesses": ()}
    assert resuming.to_wire() == {"t": "run_user", "id": 2, "accesses": (), "resume": True}
    server = ready_server()
    assert feed_one(server, packb(plain.to_wire())) == plain
    assert feed_one(server, packb(resuming.to_wire())) == resuming
    explicit = {"t": "run_user", "id": 3, "accesses": [], "resume": False}
    assert feed_one(server, packb(explicit)) == RunUser(3, ())
    local_error("bad_type", RunUser, 1, (), 1)


def test_user_result_fault_decodes_as_named_tuple() -> None:
    client = client_awaiting(RunUser(1, ()))
    obj = {"t": "user_result", "id": 1, "executed": 0, "reads": [], "fault": [0x7000, 6]}
    result = feed_one(client, packb(obj))
    assert isinstance(result, UserResult)
    assert result.fault == Fault(va=0x7000, error_code=6)
    assert isinstance(result.fault, Fault)
    assert result.fault.error_code == 6


def test_welcome_memfd_layout_and_fd_flag() -> None:
    # Four frames, then the p2m (4 x 8 bytes) padded to a whole page.
    assert wire.p2m_offset(4) == 4 * 4096
    assert WELCOME.memfd_size == 5 * 4096
    assert wire.p2m_bytes(512) == 4096
    assert wire.p2m_bytes(513) == 8192
    # 16 GiB: the p2m (32 MiB) is far beyond any message, and need not be one.
    assert wire.p2m_bytes(wire.MAX_DOMAIN_FRAMES) == wire.MAX_DOMAIN_FRAMES * 8
    assert Welcome.ANCILLARY_FDS == 1
    assert all(cls.ANCILLARY_FDS == 0 for cls in (*REQUESTS, *REPLIES))


def test_wire_bytes_are_pinned() -> None:
    # fixmap of 2: "t" -> "stats", "id" -> 5
    assert Stats(5).to_wire() == {"t": "stats", "id": 5}
    assert Connection("client").send(Bye(5)) == b"\x82\xa1t\xa3bye\xa2id\x05"
    blob = pack_mmu_updates([(0x1000, 0x67)])
    client, _server = ready_pair()
    data = client.send(Hypercall(1, abi.HYPERVISOR_mmu_update, MmuUpdateArgs(blob, 0x7FF0)))
    assert data == (
        b"\x84\xa1t\xa9hypercall\xa2id\x01\xa2op\x01\xa4args\x92\xc4\x10" + blob + b"\xcd\x7f\xf0"
    )


# --- u64 / mmu_update blobs ---------------------------------------------------------


def test_mmu_update_layout_is_little_endian_pairs() -> None:
    blob = pack_mmu_updates([(0x0102_0304_0506_0708, 0x1112_1314_1516_1718), (U64, 0)])
    assert blob == bytes.fromhex("08070605040302011817161514131211ffffffffffffffff0000000000000000")
    assert unpack_mmu_updates(blob) == [(0x0102_0304_0506_0708, 0x1112_1314_1516_1718), (U64, 0)]
    assert list(unpack_u64s(blob)) == [0x0102_0304_0506_0708, 0x1112_1314_1516_1718, U64, 0]


@given(st.lists(st.tuples(st.integers(0, U64), st.integers(0, U64)), max_size=300))
def test_mmu_update_round_trip(pairs: list[tuple[int, int]]) -> None:
    blob = pack_mmu_updates(pairs)
    assert len(blob) == 16 * len(pairs)
    assert unpack_mmu_updates(blob) == pairs
    assert b"".join(p.to_bytes(8, "little") + v.to_bytes(8, "little") for p, v in pairs) == blob


@given(st.lists(st.integers(0, U64), max_size=300))
def test_u64_round_trip(values: list[int]) -> None:
    assert list(unpack_u64s(pack_u64s(values))) == values
    view = wire.u64_view(pack_u64s(values))  # the same values, not copied
    assert list(view) == values
    assert len(view) == len(values)


def test_u64_view_rejects_a_partial_u64() -> None:
    with pytest.raises(ValueError, match="whole number"):
        wire.u64_view(b"\0" * 12)


def test_blob_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        unpack_mmu_updates(b"\x00" * 8)
    with pytest.raises(ValueError, match="u64"):
        unpack_u64s(b"\x00" * 9)
    with pytest.raises(OverflowError):
        pack_mmu_updates([(1 << 64, 0)])
    with pytest.raises(OverflowError):
        pack_u64s([-1])


# --- streaming ----------------------------------------------------------------------


def test_byte_by_byte_feeding() -> None:
    client, server = ready_pair()
    data = b"".join(client.send(r) for r in REQUESTS)
    received: list[Message] = []
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        received += drain(server)
    assert received == REQUESTS


def test_many_messages_in_one_chunk() -> None:
    client, server = ready_pair()
    stats = [Stats(i) for i in range(1000, 3000)]
    server.receive_data(b"".join(client.send(s) for s in stats))
    assert drain(server) == stats
    assert server.next_event() is NEED_DATA


def test_chunk_larger_than_the_buffer_is_fed_gradually() -> None:
    # 2 MiB of small messages into a 64 KiB decoder: all decode, none is lost.
    client, server = ready_pair(max_message_size=64 * 1024)
    messages: list[Request] = [
        Hypercall.make(i, abi.HYPERVISOR_update_va_mapping, i, U64, 0) for i in range(50_000)
    ]
    server.receive_data(b"".join(client.send(m) for m in messages))
    assert drain(server) == messages


def test_eof_between_messages_and_inside_one() -> None:
    server = Connection("server")
    server.receive_data(b"")
    assert server.next_event() is CONNECTION_CLOSED
    server = Connection("server")
    server.receive_data(packb(HELLO.to_wire())[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fatal
    assert info.value.code == "malformed"


def test_data_after_eof_is_a_local_error() -> None:
    server = Connection("server")
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        server.receive_data(b"\x80")


# --- limits -------------------------------------------------------------------------


def run_user_with_write(n: int) -> dict[str, object]:
    return RunUser(1, (Access(0, "w", b"x" * n),)).to_wire()


def test_message_size_limit_exact() -> None:
    limit = 2048
    overhead = len(packb(run_user_with_write(1000))) - 1000  # bin16 header in this range
    at_limit = packb(run_user_with_write(limit - overhead))
    assert len(at_limit) == limit
    server = ready_server(max_message_size=limit)
    assert isinstance(feed_one(server, at_limit), RunUser)
    server = ready_server(max_message_size=limit)
    error = rejected(server, packb(run_user_with_write(limit - overhead + 1)))
    assert error.fatal
    assert error.code == "too_large"


def test_message_size_limit_counts_incrementally_parsed_bytes() -> None:
    # Nested small arrays never fill the unpacker's buffer, but the message
    # as a whole is still bounded.
    server = ready_server(max_message_size=4096)
    data = packb({"t": "stats", "id": 1, "junk": [[1] * 100] * 100})
    assert len(data) > 10_000
    fed = 0

    def trickle() -> None:
        nonlocal fed
        while fed < len(data):
            server.receive_data(data[fed : fed + 100])
            fed += 100
            assert server.next_event() is NEED_DATA

    with pytest.raises(RemoteProtocolError) as info:
        trickle()
    assert info.value.fatal
    assert info.value.code == "too_large"
    assert 4096 <= fed <= 4096 + 100


def test_default_limits_admit_the_largest_legal_messages() -> None:
    client, server = ready_pair()
    reqs = pack_mmu_updates([(8 * i, i) for i in range(wire.MAX_MMU_UPDATES)])
    big = Hypercall(1, abi.HYPERVISOR_mmu_update, MmuUpdateArgs(reqs))
    assert feed_one(server, client.send(big)) == big
    welcome = Welcome(0, 1, 0, wire.MAX_DOMAIN_FRAMES, SECRET, {}, ())
    fresh = Connection("client")
    fresh.send(HELLO)
    assert feed_one(fresh, packb(welcome.to_wire())) == welcome
    reads = tuple(b"r" * wire.MAX_ACCESS_LEN for _ in range(wire.MAX_USER_ACCESSES))
    client2 = client_awaiting(RunUser(9, ()))
    result = UserResult(9, wire.MAX_USER_ACCESSES, reads, None)
    assert feed_one(client2, packb(result.to_wire())) == result


def test_over_buffer_message_is_fatal() -> None:
    server = ready_server()
    error = rejected(server, packb([b"x" * wire.MAX_BIN_LEN, b"y" * wire.MAX_BIN_LEN]))
    assert error.fatal
    assert error.code == "too_large"


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"t": "stats", "id": 1, "x": "s" * (wire.MAX_STR_LEN + 1)}, id="str"),
        pytest.param({"t": "stats", "id": 1, "x": b"b" * (wire.MAX_BIN_LEN + 1)}, id="bin"),
        pytest.param({"t": "stats", "id": 1, "x": [0] * (wire.MAX_ARRAY_LEN + 1)}, id="array"),
        pytest.param({"t": "stats", "id": 1, "x": {str(i): 0 for i in range(257)}}, id="map"),
        pytest.param(
            {"t": "stats", "id": 1, "x": msgpack.ExtType(5, b"e" * (wire.MAX_EXT_LEN + 1))},
            id="ext",
        ),
    ],
)
def test_decoder_container_limits_are_fatal(obj: object) -> None:
    error = rejected(ready_server(), packb(obj))
    assert error.fatal
    assert error.code == "too_large"


def test_decoder_limits_admit_their_maximum() -> None:
    # A map with every container at its decoder limit decodes to a (non-fatal) error.
    obj = {
        "t": "stats",
        "id": 1,
        "s": "s" * wire.MAX_STR_LEN,
        "a": [0] * wire.MAX_ARRAY_LEN,
        "m": {str(i): 0 for i in range(wire.MAX_MAP_LEN)},
        "e": msgpack.ExtType(5, b"e" * wire.MAX_EXT_LEN),
    }
    server = ready_server()
    error = rejected(server, packb(obj))
    assert not error.fatal
    assert error.code == "malformed"  # extra fields
    assert error.request_id == 1
    assert server.send(ErrorReply.from_exception(error))
    assert feed_one(server, packb(Stats(2).to_wire())) == Stats(2)


def ok(message: Message) -> None:
    assert codec_round_trip(message) == message


def local_error(code: str, build: Any, *args: Any) -> None:
    with pytest.raises(LocalProtocolError) as info:
        build(*args)
    assert info.value.code == code, info.value


@pytest.mark.parametrize(
    ("length", "code"),
    [(0, "bad_type"), (15, "bad_type"), (17, "too_large"), (64, "too_large")],
)
def test_secret_length_codes(length: int, code: str) -> None:
    """docs/protocol.md §2/§6: a secret of 0..15 bytes is bad_type, one over
    the 16-byte limit too_large, like every other field over its limit; both
    when built and when decoded (non-fatally) by either end."""
    secret = bytes(length)
    local_error(code, Join, 1, 1, 1, secret, 0)
    local_error(code, Welcome, 1, 1, 0, 1, secret, {}, ())
    server = ready_server()
    error = rejected(
        server, packb(with_field(Join(9, wire.PROTOCOL_VERSION, 1, SECRET, 1), secret=secret))
    )
    assert (error.code, error.fatal, error.request_id) == (code, False, 9)
    client = client_awaiting(Hello(5, PROTOCOL_VERSION, 1, 1))
    error = rejected(client, packb(with_field(Welcome(5, 1, 0, 1, SECRET, {}, ()), secret=secret)))
    assert (error.code, error.fatal) == (code, False)


def test_field_limits() -> None:
    ok(
        Hello(
            wire.MAX_REQUEST_ID,
            wire.PROTOCOL_VERSION,
            wire.MAX_MEMORY_MIB,
            wire.MAX_VCPUS,
            "n" * wire.MAX_NAME_LEN,
        )
    )
    local_error("bad_type", Hello, wire.MAX_REQUEST_ID + 1, 1, 1, 1)
    local_error("bad_type", Hello, -1, 1, 1, 1)
    local_error("out_of_range", Hello, 1, 1, wire.MAX_MEMORY_MIB + 1, 1)
    local_error("out_of_range", Hello, 1, 1, 0, 1)
    local_error("out_of_range", Hello, 1, 1, 1, wire.MAX_VCPUS + 1)
    local_error("out_of_range", Hello, 1, 1, 1, 0)
    local_error("too_large", Hello, 1, 1, 1, 1, "n" * (wire.MAX_NAME_LEN + 1))
    local_error("bad_type", Join, 1, 1, 1, SECRET[:15], 0)
    local_error("too_large", Join, 1, 1, 1, SECRET + b"!", 0)
    local_error("out_of_range", Join, 1, 1, 1, SECRET, wire.MAX_VCPUS)
    local_error("bad_type", Join, 1, 1, 1 << 16, SECRET, 0)
    # mmu_update
    ok(Hypercall(1, 1, MmuUpdateArgs(b"\0" * 16 * wire.MAX_MMU_UPDATES)))
    ok(Hypercall(1, 1, MmuUpdateArgs(b"")))
    local_error("too_large", MmuUpdateArgs, b"\0" * 16 * (wire.MAX_MMU_UPDATES + 1))
    local_error("bad_type", MmuUpdateArgs, b"\0" * 24)
    # foreigndom is Xen's unsigned int: FD | (PFD + 1) << 16 (docs/sources.md §6)
    pfd = (3 + 1) << 16 | abi.DOMID_SELF
    assert codec_round_trip(Hypercall(1, 1, MmuUpdateArgs(b"", pfd))).args == MmuUpdateArgs(
        b"", pfd
    )
    ok(Hypercall(1, 1, MmuUpdateArgs(b"", U32)))
    local_error("bad_type", MmuUpdateArgs, b"", U32 + 1)
    local_error("bad_type", MmuUpdateArgs, b"", -1)
    # mmuext_op
    ok(Hypercall(1, 26, MmuextOpArgs(((0, 0, 0),) * wire.MAX_MMUEXT_OPS)))
    local_error("too_large", MmuextOpArgs, ((0, 0, 0),) * (wire.MAX_MMUEXT_OPS + 1))
    local_error("bad_type", MmuextOpArgs, ((1 << 32, 0, 0),))
    local_error("bad_type", MmuextOpArgs, ((0, 0),))
    ok(Hypercall(1, 26, MmuextOpArgs((), U32)))  # unsigned int (Xen keeps bits 0-15)
    local_error("bad_type", MmuextOpArgs, (), U32 + 1)
    # update_va_mapping_otherdomain: three u64s and a domid_t
    ok(Hypercall(1, 22, UpdateVaMappingOtherdomainArgs(U64, U64, U64, 0xFFFF)))
    local_error("bad_type", UpdateVaMappingOtherdomainArgs, 0, 0, 0, 1 << 16)
    local_error("bad_type", UpdateVaMappingOtherdomainArgs, 0, 0, 0, -1)
    local_error("bad_type", UpdateVaMappingOtherdomainArgs, U64 + 1, 0, 0, 0)
    local_error("bad_type", Call, 22, RawArgs((0, 0, 0, abi.DOMID_SELF)))
    # multicall
    vm = Call(21, VmAssistArgs(0, 2))
    ok(Hypercall(1, 13, MulticallArgs((vm,) * wire.MAX_MULTICALL_CALLS)))
    local_error("too_large", MulticallArgs, (vm,) * (wire.MAX_MULTICALL_CALLS + 1))
    nested = Call(13, MulticallArgs((vm,)))
    ok(Hypercall(1, 13, MulticallArgs((nested,))))
    local_error("too_large", MulticallArgs, (Call(13, MulticallArgs((nested,))),))
    # unknown ops
    ok(Hypercall(1, 99, RawArgs((U64,) * wire.MAX_HYPERCALL_ARGS)))
    local_error("too_large", RawArgs, (0,) * (wire.MAX_HYPERCALL_ARGS + 1))
    local_error("bad_type", Call, 1, RawArgs(()))  # a known op needs its own shape
    local_error("bad_type", Call, 1 << 32, RawArgs(()))
    # run_user
    max_access = Access(U64, "w", b"w" * wire.MAX_ACCESS_LEN)
    ok(RunUser(1, (max_access,) * wire.MAX_USER_ACCESSES))
    ok(RunUser(1, (Access(0, "r", wire.MAX_ACCESS_LEN), Access(0, "x", 1))))
    local_error("too_large", RunUser, 1, (Access(0, "r", 1),) * (wire.MAX_USER_ACCESSES + 1))
    local_error("too_large", RunUser, 1, (Access(0, "r", wire.MAX_ACCESS_LEN + 1),))
    local_error("too_large", RunUser, 1, (Access(0, "w", b"w" * (wire.MAX_ACCESS_LEN + 1)),))
    local_error("out_of_range", RunUser, 1, (Access(0, "r", 0),))
    local_error("out_of_range", RunUser, 1, (Access(0, "w", b""),))
    # welcome
    local_error("out_of_range", Welcome, 0, 1, 0, wire.MAX_DOMAIN_FRAMES + 1, SECRET, {}, ())
    local_error("out_of_range", Welcome, 0, 1, 0, 0, SECRET, {}, ())
    local_error("bad_type", Welcome, 0, 1, 0, b"\0" * 8, SECRET, {}, ())
    limits = {f"k{i}": i for i in range(wire.MAX_LIMITS)}
    ok(Welcome(0, 1, 0, 1, SECRET, limits, tuple(range(wire.MAX_FEATURES))))
    local_error("too_large", Welcome, 0, 1, 0, 1, SECRET, {**limits, "x": 1}, ())
    local_error("too_large", Welcome, 0, 1, 0, 1, SECRET, {}, (0,) * (wire.MAX_FEATURES + 1))
    # replies
    ok(MulticallResult(1, 0, (-1,) * wire.MAX_MULTICALL_CALLS))
    local_error("too_large", MulticallResult, 1, 0, (0,) * (wire.MAX_MULTICALL_CALLS + 1))
    ok(AuditResult(1, ("v" * wire.MAX_TEXT_LEN,) * wire.MAX_VIOLATIONS))
    local_error("too_large", AuditResult, 1, ("v",) * (wire.MAX_VIOLATIONS + 1))
    local_error("too_large", AuditResult, 1, ("v" * (wire.MAX_TEXT_LEN + 1),))
    ok(ErrorReply(None, "internal", "m" * wire.MAX_TEXT_LEN))
    local_error("too_large", ErrorReply, 1, "internal", "m" * (wire.MAX_TEXT_LEN + 1))
    local_error("bad_type", ErrorReply, 1, "", "")
    deep: dict[str, Any] = {"a": {"b": {"c": {"d": 1}}}}
    ok(StatsResult(1, deep))
    local_error("too_large", StatsResult, 1, {"x": deep})
    local_error("bad_type", StatsResult, 1, {"a": 1.5})
    local_error("bad_type", StatsResult, 1, {"a": [1]})
    local_error("bad_type", StatsResult, 1, {1: 1})
    ok(StatsResult(1, {"neg": -(1 << 63), "big": U64}))
    local_error("bad_type", StatsResult, 1, {"x": 1 << 64})


def test_error_reply_from_exception_truncates() -> None:
    exc = RemoteProtocolError("m" * 5000, code="bad_type", request_id=4)
    reply = ErrorReply.from_exception(exc)
    assert reply == ErrorReply(4, "bad_type", "m" * wire.MAX_TEXT_LEN)


# --- type errors on decode (non-fatal) ------------------------------------------------


def with_field(message: Message, **changes: object) -> dict[str, object]:
    obj = dict(message.to_wire())
    obj.update(changes)
    return obj


MMU = REQUESTS[0]

BAD_REQUESTS = [
    # (wire map, expected code)
    pytest.param(with_field(MMU, id=True), "bad_type", id="bool-id"),
    pytest.param(with_field(MMU, id=1.0), "bad_type", id="float-id"),
    pytest.param(with_field(MMU, id=-1), "bad_type", id="negative-id"),
    pytest.param(with_field(MMU, id=1 << 63), "bad_type", id="id-over-2**63"),
    pytest.param(with_field(MMU, op="1"), "bad_type", id="str-op"),
    pytest.param(with_field(MMU, op=True), "bad_type", id="bool-op"),
    pytest.param(with_field(MMU, op=1 << 32), "bad_type", id="op-over-u32"),
    pytest.param(with_field(MMU, args=[[[0x1000, 7]], 0x7FF0]), "bad_type", id="reqs-as-list"),
    pytest.param(with_field(MMU, args=[b"\0" * 17, 0x7FF0]), "bad_type", id="reqs-not-x16"),
    pytest.param(with_field(MMU, args=[b"", 1 << 32]), "bad_type", id="foreigndom-over-u32"),
    pytest.param(
        with_field(MMU, op=26, args=[[], 1 << 32]), "bad_type", id="mmuext-foreigndom-over-u32"
    ),
    pytest.param(with_field(MMU, op=22, args=[0, 0, 0]), "bad_type", id="uvm-other-arity"),
    pytest.param(with_field(MMU, op=22, args=[0, 0, 0, 1 << 16]), "bad_type", id="uvm-other-u16"),
    pytest.param(with_field(MMU, args=[b"", None]), "bad_type", id="nil-domid"),
    pytest.param(with_field(MMU, args=[b""]), "bad_type", id="mmu-arity"),
    pytest.param(with_field(MMU, args={"reqs": b""}), "bad_type", id="args-as-map"),
    pytest.param(with_field(MMU, op=14, args=[0, U64, -1]), "bad_type", id="uvm-neg"),
    pytest.param(with_field(MMU, op=14, args=[0, 0, False]), "bad_type", id="uvm-bool"),
    pytest.param(with_field(MMU, op=26, args=[[[0, 0]], 0]), "bad_type", id="mmuext-arity"),
    pytest.param(with_field(MMU, op=26, args=[[[0, 0, 0.5]], 0]), "bad_type", id="mmuext-float"),
    pytest.param(with_field(MMU, op=21, args=[0, "2"]), "bad_type", id="vm_assist-str"),
    pytest.param(with_field(MMU, op=13, args=[[[]]]), "bad_type", id="multicall-empty-call"),
    pytest.param(with_field(MMU, op=13, args=[[[1.5]]]), "bad_type", id="multicall-float-op"),
    pytest.param(with_field(MMU, op=13, args=[[[14, 0, 0]]]), "bad_type", id="multicall-bad-uvm"),
    pytest.param(
        with_field(MMU, op=13, args=[[[13, [[13, [[21, 0, 2]]]]]]]), "too_large", id="too-deep"
    ),
    pytest.param(with_field(MMU, op=99, args=[1, "x"]), "bad_type", id="unknown-op-str-arg"),
    pytest.param(with_field(MMU, op=99, args=[-1]), "bad_type", id="unknown-op-negative"),
    pytest.param(with_field(MMU, op=99, args=[U64, [1]]), "bad_type", id="unknown-nest"),
    pytest.param(with_field(MMU, op=99, args=[0] * 7), "too_large", id="unknown-op-7-args"),
    pytest.param(with_field(Ptwr(1, 0, 0), exchange=1), "bad_type", id="ptwr-int-exchange"),
    pytest.param(with_field(Ptwr(1, 0, 0), maddr=-1), "bad_type", id="ptwr-maddr-negative"),
    pytest.param(with_field(Ptwr(1, 0, 0), clear_bits=-1), "bad_type", id="clear-bits-negative"),
    pytest.param(with_field(Ptwr(1, 0, 0), clear_bits=True), "bad_type", id="clear-bits-bool"),
    pytest.param(with_field(Ptwr(1, 0, 0), clear_bits=-(1 << 63)), "bad_type", id="clear-bits-s64"),
    pytest.param(with_field(Ptwr(1, 0, 5), clear_bits=2), "out_of_range", id="clear-bits-with-val"),
    pytest.param(
        with_field(KernelWrite(1, 0, b"x"), data=b""), "out_of_range", id="kernel-write-empty"
    ),
    pytest.param(
        with_field(KernelWrite(1, 0, b"x"), data=bytes(4097)),
        "too_large",
        id="kernel-write-too-long",
    ),
    pytest.param(
        with_field(KernelWrite(1, 0, b"x"), maddr=0x1FF9, data=bytes(8)),
        "out_of_range",
        id="kernel-write-crosses-frame",
    ),
    pytest.param(
        with_field(KernelWrite(1, 0, b"x"), data="x"), "bad_type", id="kernel-write-str-data"
    ),
    pytest.param(
        with_field(KernelWrite(1, 0, b"x"), maddr=-1), "bad_type", id="kernel-write-maddr"
    ),
    pytest.param(
        {"t": "kernel_write", "id": 1, "maddr": 0}, "malformed", id="kernel-write-no-data"
    ),
    pytest.param(with_field(RunUser(1, ()), accesses=[[0, "q", 1]]), "bad_type", id="access-kind"),
    pytest.param(
        with_field(RunUser(1, ()), accesses=[[0, b"r", 1]]), "bad_type", id="access-kind-bin"
    ),
    pytest.param(
        with_field(RunUser(1, ()), accesses=[[0, "w", 5]]), "bad_type", id="write-needs-bytes"
    ),
    pytest.param(
        with_field(RunUser(1, ()), accesses=[[0, "r", b"x"]]), "bad_type", id="read-needs-int"
    ),
    pytest.param(with_field(RunUser(1, ()), accesses=[[0, "r"]]), "bad_type", id="access-arity"),
    pytest.param(with_field(RunUser(1, ()), accesses=[[0, {}, 1]]), "bad_type", id="kind-map"),
    pytest.param(with_field(RunUser(1, ()), resume=1), "bad_type", id="resume-int"),
    pytest.param(with_field(RunUser(1, ()), resume=None), "bad_type", id="resume-nil"),
    pytest.param(
        with_field(RunUser(1, ()), resume=True, junk=1), "malformed", id="resume-extra-field"
    ),
    pytest.param(with_field(Stats(1), junk=1), "malformed", id="extra-field"),
    pytest.param({"t": "ptwr", "id": 1, "maddr": 0, "val": 0}, "malformed", id="missing-field"),
    pytest.param({"id": 1}, "malformed", id="no-t"),
    pytest.param({"t": 5, "id": 1}, "bad_type", id="int-t"),
    pytest.param({"t": ["x"], "id": 1}, "bad_type", id="array-t"),
    pytest.param({"t": "reboot", "id": 1}, "unknown_message", id="unknown-t"),
    pytest.param({"t": "result", "id": 1, "rc": 0, "done": 0}, "unknown_message", id="reply"),
    pytest.param({b"t": "stats", "id": 1}, "malformed", id="bin-key"),
    pytest.param(with_field(Stats(1), junk=msgpack.ExtType(3, b"x")), "malformed", id="ext"),
    pytest.param(
        with_field(Ptwr(1, 0, 0), val=msgpack.ExtType(3, b"x")), "bad_type", id="ext-value"
    ),
]


@pytest.mark.parametrize(("obj", "code"), BAD_REQUESTS)
def test_bad_request_is_non_fatal(obj: dict[str, object], code: str) -> None:
    server = ready_server()
    error = rejected(server, packb(obj))
    assert error.code == code, error
    assert not error.fatal
    assert not server.broken
    rid = obj.get("id")
    expected_id = rid if type(rid) is int and 0 <= rid < 1 << 63 else None
    assert error.request_id == expected_id
    # The server answers and carries on.
    reply = ErrorReply.from_exception(error)
    echoed = unpackb(server.send(reply))
    assert echoed["id"] == expected_id
    assert echoed["code"] == code
    assert feed_one(server, packb(Stats(77).to_wire())) == Stats(77)
    assert state_of(server) is State.READY


BAD_REPLIES = [
    pytest.param(Stats(1), {"t": "stats_result", "id": 1, "stats": {"a": None}}, "bad_type"),
    pytest.param(Stats(1), {"t": "stats_result", "id": 1, "stats": [1]}, "bad_type"),
    pytest.param(Audit(1), {"t": "audit_result", "id": 1, "violations": [1]}, "bad_type"),
    pytest.param(
        RunUser(1, ()),
        {"t": "user_result", "id": 1, "executed": 0, "reads": [], "fault": [1]},
        "bad_type",
    ),
    pytest.param(
        RunUser(1, ()),
        {"t": "user_result", "id": 1, "executed": 0, "reads": ["s"], "fault": None},
        "bad_type",
    ),
    pytest.param(Ptwr(1, 0, 0), {"t": "ptwr_result", "id": 1, "rc": 1 << 63, "old": 0}, "bad_type"),
    pytest.param(
        KernelWrite(1, 0, b"x"), {"t": "kernel_write_result", "id": 1, "rc": "0"}, "bad_type"
    ),
    pytest.param(
        KernelWrite(1, 0, b"x"), {"t": "result", "id": 1, "rc": 0, "done": 0}, "bad_state"
    ),
    pytest.param(Stats(1), {"t": "error", "id": 1, "code": 5, "message": ""}, "bad_type"),
    pytest.param(Stats(1), {"t": "hello", "id": 1}, "unknown_message"),
    pytest.param(Stats(1), {"t": "result", "id": 2, "rc": 0, "done": 0}, "bad_state"),
    pytest.param(Stats(1), {"t": "result", "id": 1, "rc": 0, "done": 0}, "bad_state"),
    pytest.param(
        HELLO,
        dict(WELCOME.to_wire(), nr_frames=b"\x01"),
        "bad_type",
    ),
    pytest.param(HELLO, dict(WELCOME.to_wire(), limits={"a": -1}), "bad_type"),
    pytest.param(HELLO, dict(WELCOME.to_wire(), secret=b"short"), "bad_type"),
]


@pytest.mark.parametrize(("request_", "obj", "code"), BAD_REPLIES)
def test_bad_reply_is_non_fatal(request_: Request, obj: dict[str, object], code: str) -> None:
    client = client_awaiting(request_)
    error = rejected(client, packb(obj))
    assert error.code == code, error
    assert not error.fatal
    assert request_.id not in client.pending_ids or obj["id"] != request_.id


# --- fatal errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(b"\xc1", "malformed", id="never-used-byte"),
        pytest.param(packb([1, 2]), "malformed", id="top-level-array"),
        pytest.param(packb(5), "malformed", id="top-level-int"),
        pytest.param(packb(None), "malformed", id="top-level-nil"),
        pytest.param(packb({1: 2}), "malformed", id="int-map-key"),
        pytest.param(packb({"t": {3: 4}}), "malformed", id="nested-int-map-key"),
        pytest.param(b"\xa2\xff\xfe", "malformed", id="bad-utf8"),
        pytest.param(b"\x91" * 5000, "malformed", id="nesting-stack"),
        pytest.param(b"\xdf\xff\xff\xff\xff", "too_large", id="4G-map-header"),
        pytest.param(b"\xdd\xff\xff\xff\xff", "too_large", id="4G-array-header"),
    ],
)
def test_corrupt_stream_is_fatal_and_stays_dead(data: bytes, code: str) -> None:
    server = ready_server()
    error = rejected(server, data)
    assert error.fatal
    assert error.code == code
    assert server.broken
    server.receive_data(packb(Stats(1).to_wire()))  # ignored: the stream is dead
    with pytest.raises(RemoteProtocolError) as again:
        server.next_event()
    assert again.value.fatal
    # A courtesy error reply is still allowed before closing.
    assert server.send(ErrorReply.from_exception(error))


@pytest.mark.parametrize("header", [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"])
def test_huge_declared_str_or_bin_is_bounded_by_message_size(header: bytes) -> None:
    # msgpack checks str/bin lengths only once the payload is there; the
    # message-size bound stops the peer long before 4 GiB.
    server = ready_server(max_message_size=4096)
    server.receive_data(b"\x81\xa1t" + header)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"z" * 4000)
    assert server.next_event() is NEED_DATA
    error = rejected(server, b"z" * 100)
    assert error.fatal
    assert error.code == "too_large"


def test_valid_message_before_corruption_is_delivered() -> None:
    server = ready_server()
    server.receive_data(packb(Stats(1).to_wire()) + b"\xc1")
    assert server.next_event() == Stats(1)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


# --- state machine ------------------------------------------------------------------


def test_server_requires_hello_first() -> None:
    server = Connection("server")
    error = rejected(server, packb(Stats(1).to_wire()))
    assert (error.code, error.fatal, error.request_id) == ("bad_state", False, 1)
    server.send(ErrorReply.from_exception(error))
    assert state_of(server) is State.IDLE
    assert feed_one(server, packb(HELLO.to_wire())) == HELLO
    assert state_of(server) is State.HANDSHAKE


def test_second_hello_or_join_is_bad_state() -> None:
    server = ready_server()
    error = rejected(server, packb(Hello(5, wire.PROTOCOL_VERSION, 16, 1).to_wire()))
    assert (error.code, error.fatal, error.request_id) == ("bad_state", False, 5)
    error = rejected(server, packb(Join(6, wire.PROTOCOL_VERSION, 1, SECRET, 1).to_wire()))
    assert error.code == "bad_state"
    assert state_of(server) is State.READY


def test_request_during_handshake_is_bad_state() -> None:
    server = Connection("server")
    feed_one(server, packb(HELLO.to_wire()))
    error = rejected(server, packb(Stats(3).to_wire()))
    assert error.code == "bad_state"
    assert state_of(server) is State.HANDSHAKE


@pytest.mark.parametrize("cls", [Hello, Join])
def test_wrong_version(cls: type[Hello] | type[Join]) -> None:
    args: tuple[object, ...] = (16, 1, "") if cls is Hello else (1, SECRET, 0)
    message = cls(4, PROTOCOL_VERSION + 1, *args)  # type: ignore[arg-type]
    server = Connection("server")
    error = rejected(server, packb(message.to_wire()))
    assert (error.code, error.fatal, error.request_id) == ("version", False, 4)
    server.send(ErrorReply.from_exception(error))
    assert state_of(server) is State.IDLE


def test_version_is_checked_before_other_fields() -> None:
    obj = {"t": "hello", "id": 1, "version": wire.PROTOCOL_VERSION + 1, "future": "field"}
    error = rejected(Connection("server"), packb(obj))
    assert error.code == "version"


def test_handshake_error_returns_to_idle_and_retry_works() -> None:
    client, server = Connection("client"), Connection("server")
    join = Join(1, PROTOCOL_VERSION, 3, SECRET, 1)
    feed_one(server, client.send(join))
    reply = ErrorReply(1, WireErrorCode.BAD_SECRET, "wrong secret")
    assert feed_one(client, server.send(reply)) == reply
    assert state_of(client) is state_of(server) is State.IDLE
    feed_one(server, client.send(Hello(2, PROTOCOL_VERSION, 16, 1)))
    feed_one(client, server.send(Welcome(2, 2, 0, 1, SECRET, {}, ())))
    assert state_of(client) is state_of(server) is State.READY


def test_duplicate_request_id() -> None:
    client, server = ready_pair()
    feed_one(server, client.send(Stats(5)))
    error = rejected(server, packb(Audit(5).to_wire()))
    assert error.code == "bad_state"
    assert error.request_id is None  # the original request keeps its slot
    server.send(ErrorReply.from_exception(error))
    server.send(StatsResult(5, {}))
    with pytest.raises(LocalProtocolError, match="already awaiting"):
        client.send(Audit(5))


def test_after_bye_only_eof() -> None:
    client, server = ready_pair()
    feed_one(server, client.send(Bye(1)))
    error = rejected(server, packb(Stats(2).to_wire()))
    assert error.fatal
    assert error.code == "bad_state"
    with pytest.raises(LocalProtocolError):
        client.send(Stats(2))
    client.receive_data(server.send(Goodbye(1)))
    assert client.next_event() == Goodbye(1)
    error = rejected(client, packb(Result(2, 0).to_wire()))
    assert error.fatal
    with pytest.raises(LocalProtocolError, match="after goodbye"):
        server.send(ErrorReply(None, "internal"))


def test_bye_is_allowed_before_hello() -> None:
    client, server = Connection("client"), Connection("server")
    feed_one(server, client.send(Bye(1)))
    feed_one(client, server.send(Goodbye(1)))
    assert state_of(client) is state_of(server) is State.CLOSED


def test_pipelined_replies_before_goodbye() -> None:
    client, server = ready_pair()
    server.receive_data(client.send(Stats(1)) + client.send(Bye(2)))
    assert drain(server) == [Stats(1), Bye(2)]
    client.receive_data(server.send(StatsResult(1, {"a": 1})) + server.send(Goodbye(2)))
    assert drain(client) == [StatsResult(1, {"a": 1}), Goodbye(2)]
    assert state_of(client) is State.CLOSED


def test_server_send_errors() -> None:
    server = ready_server()
    with pytest.raises(LocalProtocolError, match="server cannot send"):
        server.send(Stats(1))
    with pytest.raises(LocalProtocolError, match="no request with id 1"):
        server.send(Result(1, 0))
    server.receive_data(packb(Stats(1).to_wire()))
    server.next_event()
    with pytest.raises(LocalProtocolError, match="stats_result"):
        server.send(Result(1, 0))
    with pytest.raises(LocalProtocolError, match="no request"):
        server.send(Welcome(9, 1, 0, 1, SECRET, {}, ()))
    server.send(StatsResult(1, {}))
    with pytest.raises(LocalProtocolError):
        server.send(StatsResult(1, {}))  # already answered
    server.receive_data(packb(MULTICALL.to_wire()))
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(Result(7, 0))  # a multicall is answered by MulticallResult
    server.send(MulticallResult(7, 0, ()))
    server.send(ErrorReply(None, "internal", "always allowed"))


def test_client_send_errors() -> None:
    client = Connection("client")
    with pytest.raises(LocalProtocolError, match="client cannot send"):
        client.send(Result(1, 0))
    with pytest.raises(LocalProtocolError, match="state IDLE"):
        client.send(Stats(1))
    client.send(HELLO)
    with pytest.raises(LocalProtocolError, match="state HANDSHAKE"):
        client.send(Stats(1))
    with pytest.raises(LocalProtocolError, match="state HANDSHAKE"):
        client.send(Bye(1))
    client, _server = ready_pair()
    with pytest.raises(LocalProtocolError, match="state READY"):
        client.send(Hello(1, wire.PROTOCOL_VERSION, 16, 1))


def test_client_checks_reply_ids_and_types() -> None:
    client = client_awaiting(Stats(1))
    error = rejected(client, packb(Result(1, 0).to_wire()))
    assert error.code == "bad_state"
    assert not client.pending_ids  # the reply came, unusable: stop waiting
    client.send(Stats(2))
    error = rejected(client, packb(StatsResult(3, {}).to_wire()))
    assert error.code == "bad_state"
    assert client.pending_ids == {2}
    unattributed = ErrorReply(None, "malformed", "what")
    assert feed_one(client, packb(unattributed.to_wire())) == unattributed
    assert client.pending_ids == {2}


def test_send_rejects_oversized_encoding() -> None:
    client, _server = ready_pair(max_message_size=1024)
    with pytest.raises(LocalProtocolError) as info:
        client.send(RunUser(1, (Access(0, "w", b"x" * 2000),)))
    assert info.value.code == "too_large"
    assert not client.pending_ids


def test_constructor_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        Connection("peer")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Connection("server", max_message_size=wire.MAX_MESSAGE_SIZE + 1)


# --- local construction and make_call ---------------------------------------------------


@pytest.mark.parametrize(
    ("build", "args"),
    [
        (Stats, (True,)),
        (Ptwr, (1, 0, 0, 1)),
        (Ptwr, (1, -1, 0)),
        (Ptwr, (1, 0, 7, False, 2)),  # clear_bits needs val 0
        (Ptwr, (1, 0, 0, False, -1)),
        (KernelWrite, (1, 0, b"")),
        (KernelWrite, (1, 0xFFF, b"ab")),  # crosses into the next frame
        (KernelWrite, (1, 0, bytearray(b"ab"))),
        (KernelWriteResult, (1, 1 << 63)),
        (Result, (1, 1 << 63, 0)),
        (Result, (1, 0, -1)),
        (MmuUpdateArgs, (bytearray(16),)),
        (MmuextOpArgs, ([(0, 0, 0)],)),  # a list is not a tuple
        (UpdateVaMappingArgs, (0, 0, 1.0)),
        (Hypercall, (1, 1, VmAssistArgs(0, 0))),
        (Hypercall, (1, 99, MmuUpdateArgs(b""))),
        (MulticallArgs, ((VmAssistArgs(0, 0),),)),
        (RunUser, (1, ((0, "r", True),))),
        (UserResult, (1, 0, (), (1, 2, 3))),
        (UserResult, (1, 0, (bytearray(b"x"),), None)),
        (Welcome, (0, 1, 0, 1, SECRET, {"": 1}, ())),
        (ErrorReply, (1, None, "")),
    ],
)
def test_invalid_local_messages(build: Any, args: tuple[object, ...]) -> None:
    with pytest.raises(LocalProtocolError):
        build(*args)


def test_make_call() -> None:
    call = make_call(abi.HYPERVISOR_mmu_update, [(0x1000, 7)])
    assert call == Call(1, MmuUpdateArgs(pack_mmu_updates([(0x1000, 7)]), abi.DOMID_SELF))
    assert make_call(1, b"", 3) == Call(1, MmuUpdateArgs(b"", 3))
    assert make_call(26, [[5, 1, 0]]) == Call(26, MmuextOpArgs(((5, 1, 0),)))
    assert make_call(29, 1, 2) == Call(29, RawArgs((1, 2)))
    assert make_call(22, 1, 2, 3, 4) == Call(22, UpdateVaMappingOtherdomainArgs(1, 2, 3, 4))
    assert make_call(13, [Call(29, RawArgs(())), (21, 0, 2)]).args == MulticallArgs(
        (Call(29, RawArgs(())), Call(21, VmAssistArgs(0, 2)))
    )
    for bad in [
        (1, [(1, 2, 3)]),
        (1, [(-1, 0)]),
        (14, 1, 2),
        (22, 1, 2, 3),
        (26, 5),
        (13, [5]),
        (21, 0, 2.5),
    ]:
        with pytest.raises(LocalProtocolError):
            make_call(*bad)  # type: ignore[arg-type]


def test_errors_hierarchy() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    exc = RemoteProtocolError("boom", code="too_large", fatal=True, request_id=3)
    assert (exc.message, exc.code, exc.fatal, exc.request_id) == ("boom", "too_large", True, 3)
    assert "fatal=True" in repr(exc)
    assert {
        "malformed",
        "too_large",
        "bad_type",
        "unknown_message",
        "bad_state",
        "version",
        "bad_secret",
        "no_such_domain",
        "out_of_range",
        "not_supported",
        "internal",
    } == WireErrorCode.ALL


def test_no_trio_in_shared() -> None:
    import subprocess
    import sys

    code = "import sys, pvemu.shared.wire, pvemu.shared.errors; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_c_extension_is_used() -> None:
    assert msgpack.Unpacker.__module__ == "msgpack._cmsgpack"


# --- property tests -------------------------------------------------------------------

u64s = st.integers(0, U64)
s64s = st.integers(-(1 << 63), (1 << 63) - 1)
ids = st.integers(0, wire.MAX_REQUEST_ID)
names = st.text(max_size=wire.MAX_NAME_LEN)
texts = st.text(max_size=64)


def leaf_args(op: int) -> st.SearchStrategy[Any]:
    if op == 1:
        blobs = st.lists(st.tuples(u64s, u64s), max_size=8).map(pack_mmu_updates)
        return st.builds(MmuUpdateArgs, blobs, st.integers(0, U32))
    if op == 26:
        triples = st.tuples(st.integers(0, 0xFFFF_FFFF), u64s, u64s)
        return st.builds(
            MmuextOpArgs, st.lists(triples, max_size=4).map(tuple), st.integers(0, U32)
        )
    if op == 14:
        return st.builds(UpdateVaMappingArgs, u64s, u64s, u64s)
    if op == 22:
        return st.builds(UpdateVaMappingOtherdomainArgs, u64s, u64s, u64s, st.integers(0, 0xFFFF))
    if op == 21:
        return st.builds(VmAssistArgs, st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF))
    return st.builds(RawArgs, st.lists(u64s, max_size=6).map(tuple))


leaf_ops = st.sampled_from([1, 14, 21, 22, 26, 0, 99, 0xFFFF_FFFF])
leaf_calls = leaf_ops.flatmap(lambda op: leaf_args(op).map(lambda a: Call(op, a)))
inner_multicalls = st.lists(leaf_calls, max_size=3).map(
    lambda calls: Call(13, MulticallArgs(tuple(calls)))
)
calls = st.one_of(leaf_calls, inner_multicalls)
hypercalls = st.one_of(
    st.builds(lambda i, c: Hypercall(i, c.op, c.args), ids, calls),
    st.builds(
        lambda i, cs: Hypercall(i, 13, MulticallArgs(tuple(cs))), ids, st.lists(calls, max_size=4)
    ),
)
accesses = st.one_of(
    st.builds(Access, u64s, st.sampled_from(["r", "x"]), st.integers(1, wire.MAX_ACCESS_LEN)),
    st.builds(Access, u64s, st.just("w"), st.binary(min_size=1, max_size=16)),
)
requests = st.one_of(
    st.builds(
        Hello, ids, st.just(PROTOCOL_VERSION), st.integers(1, 1024), st.integers(1, 64), names
    ),
    st.builds(
        Join,
        ids,
        st.just(PROTOCOL_VERSION),
        st.integers(0, 0xFFFF),
        st.just(SECRET),
        st.integers(0, 63),
    ),
    hypercalls,
    st.builds(Ptwr, ids, u64s, u64s, st.booleans()),
    st.builds(Ptwr, ids, u64s, st.just(0), st.booleans(), u64s),
    st.builds(
        lambda i, m, n: KernelWrite(i, m, bytes(min(n, 4096 - m % 4096))),
        ids,
        u64s,
        st.integers(1, 4096),
    ),
    st.builds(RunUser, ids, st.lists(accesses, max_size=4).map(tuple), st.booleans()),
    st.builds(Stats, ids),
    st.builds(Audit, ids),
    st.builds(Bye, ids),
)
stats_trees = st.recursive(
    st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(s64s, u64s), max_size=4),
    lambda inner: st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3),
    max_leaves=12,
).filter(lambda d: _depth(d) <= wire.MAX_STATS_DEPTH)


def _depth(tree: dict[str, Any]) -> int:
    subs = [_depth(v) for v in tree.values() if isinstance(v, dict)]
    return 1 + max(subs, default=0)


replies = st.one_of(
    st.builds(
        Welcome,
        ids,
        st.integers(0, 0xFFFF),
        st.integers(0, 63),
        st.integers(1, wire.MAX_DOMAIN_FRAMES),
        st.binary(min_size=16, max_size=16),
        st.dictionaries(st.text(min_size=1, max_size=8), u64s, max_size=4),
        st.lists(st.integers(0, 0xFFFF_FFFF), max_size=4).map(tuple),
    ),
    st.builds(Result, ids, s64s, u64s),
    st.builds(MulticallResult, ids, s64s, st.lists(s64s, max_size=8).map(tuple)),
    st.builds(PtwrResult, ids, s64s, u64s),
    st.builds(KernelWriteResult, ids, s64s),
    st.builds(
        UserResult,
        ids,
        st.integers(0, wire.MAX_USER_ACCESSES),
        st.lists(st.binary(max_size=16), max_size=4).map(tuple),
        st.none() | st.builds(Fault, u64s, st.integers(0, 0xFFFF_FFFF)),
    ),
    st.builds(StatsResult, ids, stats_trees),
    st.builds(AuditResult, ids, st.lists(texts, max_size=4).map(tuple)),
    st.builds(ErrorReply, st.none() | ids, st.sampled_from(sorted(WireErrorCode.ALL)), texts),
    st.builds(Goodbye, ids),
)


@given(st.one_of(requests, replies))
def test_property_round_trip(message: Message) -> None:
    assert codec_round_trip(message) == message


def pump(conn: Connection, chunks: list[bytes], *, eof: bool) -> list[Message]:
    """Feed ``chunks`` then maybe EOF; only RemoteProtocolError may escape
    ``next_event``. A server answers every request and every rejection, which
    must always be allowed by its own state machine."""
    out: list[Message] = []
    for chunk in [*chunks, b""] if eof else chunks:
        conn.receive_data(chunk)
        while True:
            error: RemoteProtocolError | None = None
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                error = exc
            if error is not None:
                assert error.code in WireErrorCode.ALL
                if error.fatal:
                    assert conn.broken
                    with pytest.raises(RemoteProtocolError):
                        conn.next_event()
                    return out
                if conn.role == "server":
                    conn.send(ErrorReply.from_exception(error))
                continue
            if not isinstance(event, Message):
                break
            out.append(event)
            if conn.role == "server":
                conn.send(server_answer(event))
    return out


def server_answer(request: Message) -> Reply:
    if isinstance(request, Hello | Join):
        return Welcome(request.id, 1, 0, 1, SECRET, {}, ())
    if isinstance(request, Bye):
        return Goodbye(request.id)
    return ErrorReply(request.id, WireErrorCode.INTERNAL, "test")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=512), st.lists(st.integers(0, 512), max_size=8), st.booleans())
def test_random_bytes_only_raise_protocol_errors(
    data: bytes, cuts: list[int], server_role: bool
) -> None:
    conn = Connection("server" if server_role else "client")
    if not server_role:
        conn.send(HELLO)
    pump(conn, split(data, cuts), eof=True)


@PROPERTY
@given(
    st.lists(requests, min_size=1, max_size=6),
    st.data(),
)
def test_corrupted_streams_only_raise_protocol_errors(
    messages: list[Request], data: st.DataObject
) -> None:
    stream = bytearray(b"".join(packb(m.to_wire()) for m in [HELLO, *messages]))
    mutation = data.draw(st.sampled_from(["none", "truncate", "flip", "insert", "delete"]))
    if mutation == "truncate":
        del stream[data.draw(st.integers(0, len(stream))) :]
    elif mutation == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(stream) - 1))
            stream[pos] ^= data.draw(st.integers(1, 255))
    elif mutation == "insert":
        pos = data.draw(st.integers(0, len(stream)))
        stream[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    elif mutation == "delete":
        pos = data.draw(st.integers(0, len(stream) - 1))
        del stream[pos : pos + data.draw(st.integers(1, 8))]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    out = pump(Connection("server"), split(bytes(stream), cuts), eof=True)
    if mutation == "none":
        # Uncorrupted: everything decodes (some may be rejected by state, non-fatally).
        assert out[0] == HELLO
        assert all(m in messages for m in out[1:])


# --- over trio streams --------------------------------------------------------------


async def serve_one(stream: trio.abc.Stream) -> list[Message]:
    """A miniature hypervisor loop: answer every request until EOF."""
    conn = Connection("server")
    seen: list[Message] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 16))
            continue
        if event is CONNECTION_CLOSED:
            await stream.aclose()
            return seen
        assert isinstance(event, Request)
        seen.append(event)
        reply: Reply
        if isinstance(event, Hello):
            reply = WELCOME
        elif isinstance(event, Bye):
            reply = Goodbye(event.id)
        else:
            reply = REPLIES[[r.id for r in REQUESTS].index(event.id)]
        await stream.send_all(conn.send(reply))


async def run_client(stream: trio.abc.Stream) -> list[Message]:
    conn = Connection("client")

    async def call(request: Request) -> Message:
        await stream.send_all(conn.send(request))
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 16))
                continue
            assert isinstance(event, Message)
            return event

    replies = [await call(HELLO)]
    replies += [await call(r) for r in REQUESTS]
    replies.append(await call(Bye(1000)))
    assert state_of(conn) is State.CLOSED
    await stream.aclose()
    return replies


@pytest.mark.parametrize(
    "make_pair",
    [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair],
)
async def test_over_trio_stream_pair(make_pair: Any) -> None:
    client_stream, server_stream = make_pair()
    results: dict[str, list[Message]] = {}

    async def server_task() -> None:
        results["server"] = await serve_one(server_stream)

    async def client_task() -> None:
        results["client"] = await run_client(client_stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_task)
        nursery.start_soon(client_task)
    assert results["server"] == [HELLO, *REQUESTS, Bye(1000)]
    assert results["client"] == [WELCOME, *REPLIES, Goodbye(1000)]


async def test_partial_reads_over_a_trickling_stream() -> None:
    # The server reads at most 3 bytes at a time.
    client_stream, server_stream = trio.testing.memory_stream_pair()
    conn = Connection("server")
    got: list[Message] = []
    sender = Connection("client")
    payload = sender.send(HELLO)

    async def writer() -> None:
        await client_stream.send_all(payload)
        await client_stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await server_stream.receive_some(3))
            elif event is CONNECTION_CLOSED:
                break
            else:
                assert isinstance(event, Message)
                got.append(event)
    assert got == [HELLO]


# --- the fast paths decode exactly as the general path does ---------------------------

#: Values around every bound the fast paths check, and every wrong wire type.
_EDGE_VALUES: list[object] = [
    *(-(1 << 63), -1, 0, 1, 7, 8, 13, 0xFFFF, U32, U32 + 1),
    *(wire.MAX_REQUEST_ID, wire.MAX_REQUEST_ID + 1, U64),
    *(None, True, False, 1.0, "1", b"1", (), (1,), {"a": 1}, bytes(8), bytes(15), bytes(32)),
]
_edges = st.sampled_from(_EDGE_VALUES)
_records = st.lists(st.tuples(u64s, u64s), max_size=3).map(pack_mmu_updates)


@st.composite
def _mutated(draw: Any, valid: dict[str, object]) -> dict[str, object]:
    """``valid``, or it with one thing wrong: a field (or an mmu_update
    argument) replaced by an edge value, a field dropped, an extra key."""
    obj = dict(valid)
    what = draw(st.sampled_from(["none", "field", "drop", "extra", "arg", "arity"]))
    if what == "field":
        obj[draw(st.sampled_from(sorted(obj)))] = draw(_edges)
    elif what == "drop":
        del obj[draw(st.sampled_from(sorted(obj)))]
    elif what == "extra":
        obj[draw(st.sampled_from(["extra", "T"]))] = 1
    elif what == "arg" and "args" in obj:
        args = list(obj["args"])  # type: ignore[call-overload]
        args[draw(st.integers(0, 1))] = draw(st.one_of(_edges, st.binary(max_size=40)))
        obj["args"] = tuple(args)
    elif what == "arity" and "args" in obj:
        obj["args"] = draw(st.sampled_from([(), (b"",), (b"", 0x7FF0, 0)]))
    return obj


_fast_requests = st.one_of(
    st.fixed_dictionaries(
        {
            "t": st.sampled_from(["hypercall", "hypercalls"]),
            "id": st.sampled_from([7, 9]) | ids,
            "op": st.just(abi.HYPERVISOR_mmu_update),
            "args": st.tuples(_records, st.integers(0, U32)),
        }
    ).flatmap(_mutated),
    st.fixed_dictionaries(
        {
            "t": st.sampled_from(["ptwr", "PTWR"]),
            "id": st.sampled_from([7, 9]) | ids,
            "maddr": u64s,
            "val": u64s,
            "exchange": st.booleans(),
        }
    ).flatmap(_mutated),
    st.fixed_dictionaries(
        {
            "t": st.just("ptwr"),
            "id": st.sampled_from([7, 9]) | ids,
            "maddr": u64s,
            "val": st.sampled_from([0, 1]) | u64s,
            "exchange": st.booleans(),
            "clear_bits": st.sampled_from([0, 2, U64]) | u64s,
        }
    ).flatmap(_mutated),
)
_reply_ids = st.sampled_from([7, 8, 9]) | ids
_fast_replies = st.one_of(
    st.fixed_dictionaries(
        {
            "t": st.sampled_from(["result", "results"]),
            "id": _reply_ids,
            "rc": st.integers(-(1 << 63), (1 << 63) - 1),
            "done": u64s,
        }
    ).flatmap(_mutated),
    st.fixed_dictionaries(
        {
            "t": st.just("result"),
            "id": _reply_ids,
            "rc": st.integers(-(1 << 63), (1 << 63) - 1),
            "done": st.integers(0, 5) | u64s,
            "olds": st.binary(max_size=41),
        }
    ).flatmap(_mutated),
    st.fixed_dictionaries(
        {
            "t": st.just("ptwr_result"),
            "id": _reply_ids,
            "rc": st.integers(-(1 << 63), (1 << 63) - 1),
            "old": u64s,
        }
    ).flatmap(_mutated),
)


def _decode(conn: Connection, data: bytes) -> tuple[object, ...]:
    """What decoding ``data`` does: the message or the error, and the state after."""
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except RemoteProtocolError as exc:
        outcome: tuple[object, ...] = ("error", exc.code, exc.fatal, exc.request_id, exc.message)
    else:
        outcome = ("ok", type(event), event)
    return (*outcome, conn.state, conn.pending_ids, conn.next_event())


def _server_with_pending() -> Connection:
    server = ready_server()
    server.receive_data(packb(Stats(7).to_wire()))
    assert server.next_event() == Stats(7)
    return server


def _client_with_pending() -> Connection:
    client = ready_pair()[0]
    client.send(Hypercall.make(7, abi.HYPERVISOR_mmu_update, [(1, 2)]))
    client.send(Ptwr(8, 0x1000, 5))
    return client


def _general_path_only() -> Any:
    from unittest import mock

    from pvemu.shared.wire import _connection

    return mock.patch.multiple(
        _connection, fast_request=lambda obj: None, fast_reply=lambda obj: None
    )


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_fast_requests)
def test_fast_request_path_decodes_as_the_general_path(obj: dict[str, object]) -> None:
    data = packb(obj)
    fast = _decode(_server_with_pending(), data)
    with _general_path_only():
        general = _decode(_server_with_pending(), data)
    assert fast == general


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_fast_replies)
def test_fast_reply_path_decodes_as_the_general_path(obj: dict[str, object]) -> None:
    data = packb(obj)
    fast = _decode(_client_with_pending(), data)
    with _general_path_only():
        general = _decode(_client_with_pending(), data)
    assert fast == general


_VALID_FAST_MAPS: list[tuple[str, dict[str, object]]] = [
    ("server", {"t": "hypercall", "id": 9, "op": 1, "args": (bytes(16), 0x7FF0)}),
    ("server", {"t": "ptwr", "id": 9, "maddr": 0x1000, "val": 0x2067, "exchange": False}),
    (
        "server",
        {"t": "ptwr", "id": 9, "maddr": 0x1000, "val": 0, "exchange": False, "clear_bits": 2},
    ),
    ("client", {"t": "result", "id": 7, "rc": 0, "done": 1}),
    ("client", {"t": "result", "id": 7, "rc": 0, "done": 2, "olds": bytes(16)}),
    ("client", {"t": "ptwr_result", "id": 8, "rc": 0, "old": 0x2067}),
]


def _one_change_each(role: str, valid: dict[str, object]) -> list[dict[str, object]]:
    """Every map ``valid`` becomes with one field (or mmu_update argument)
    set to one edge value."""
    out = []
    for key in valid:
        out += [{**valid, key: value} for value in _EDGE_VALUES]
    if "args" in valid:
        out += [{**valid, "args": (value, 0x7FF0)} for value in _EDGE_VALUES]
        out += [{**valid, "args": (bytes(16), value)} for value in _EDGE_VALUES]
    return out


@pytest.mark.parametrize(("role", "valid"), _VALID_FAST_MAPS)
def test_fast_paths_agree_on_every_edge_of_every_field(role: str, valid: dict[str, object]) -> None:
    fresh = _server_with_pending if role == "server" else _client_with_pending
    for obj in [valid, *_one_change_each(role, valid)]:
        data = packb(obj)
        fast = _decode(fresh(), data)
        with _general_path_only():
            general = _decode(fresh(), data)
        assert fast == general, obj


def test_fast_paths_take_the_common_shapes() -> None:
    """The shapes every trap carries really go the fast way (and equal the
    messages the constructors build)."""
    from pvemu.shared.wire import _fast

    hypercall = Hypercall.make(3, abi.HYPERVISOR_mmu_update, [(0x1008, 0x2067)])
    ptwr = Ptwr(4, 0x1000, 0x2067, True)
    clear = Ptwr(5, 0x1000, 0, clear_bits=0x2)
    for request in (hypercall, ptwr, clear):
        assert _fast.fast_request(unpackb(packb(request.to_wire()))) == request
    for reply in (Result(3, -22, 1), Result(3, 0, 2, bytes(16)), PtwrResult(4, 0, 0x2067)):
        assert _fast.fast_reply(unpackb(packb(reply.to_wire()))) == reply
    multicall = Hypercall.make(5, abi.HYPERVISOR_multicall, [(abi.HYPERVISOR_mmu_update, [])])
    assert _fast.fast_request(unpackb(packb(multicall.to_wire()))) is None


def test_ptwr_clear_bits_is_left_out_when_zero() -> None:
    """A ptwr without clear_bits is encoded as before the field existed, a
    map without the key decodes as 0 on both paths, and an explicit 0 is
    the same message."""
    old_map = {"t": "ptwr", "id": 9, "maddr": 0x1000, "val": 0x2067, "exchange": True}
    assert Ptwr(9, 0x1000, 0x2067, True).to_wire() == old_map
    for obj in (old_map, {**old_map, "clear_bits": 0}):
        assert feed_one(_server_with_pending(), packb(obj)) == Ptwr(9, 0x1000, 0x2067, True)
        with _general_path_only():
            decoded = feed_one(_server_with_pending(), packb(obj))
        assert decoded == Ptwr(9, 0x1000, 0x2067, True)
    clear = Ptwr(9, 0x1000, 0, True, clear_bits=0x42)
    assert clear.to_wire() == {**old_map, "val": 0, "clear_bits": 0x42}
    assert codec_round_trip(clear) == clear


def test_hypercall_for_call_and_as_call() -> None:
    call = wire.make_call(abi.HYPERVISOR_mmu_update, [(0x1008, 0x2067)])
    request = Hypercall.for_call(9, call)
    assert request == Hypercall(9, call.op, call.args)
    assert request.as_call() == call
    with pytest.raises(LocalProtocolError):
        Hypercall.for_call(-1, call)


def test_result_olds_are_left_out_when_empty() -> None:
    """A result without exchange olds is encoded as before the field
    existed, and a map without the key decodes as empty on both paths."""
    old_map = {"t": "result", "id": 7, "rc": 0, "done": 1}
    assert Result(7, 0, 1).to_wire() == old_map
    for obj in (old_map, {**old_map, "olds": b""}):
        assert feed_one(_client_with_pending(), packb(obj)) == Result(7, 0, 1)
        with _general_path_only():
            assert feed_one(_client_with_pending(), packb(obj)) == Result(7, 0, 1)
    olds = pack_u64s([0x8000_0000_0000_0067, 0])
    result = Result(7, -abi.EBUSY, 2, olds)
    assert result.to_wire() == {**old_map, "rc": -abi.EBUSY, "done": 2, "olds": olds}
    assert codec_round_trip(result) == result
    assert result.old_values() == [0x8000_0000_0000_0067, 0]


@pytest.mark.parametrize(
    ("done", "olds", "code"),
    [
        (1, bytes(16), WireErrorCode.OUT_OF_RANGE),  # more olds than records done
        (2, bytes(12), WireErrorCode.BAD_TYPE),  # not whole u64s
        (2, "no", WireErrorCode.BAD_TYPE),
    ],
)
def test_result_olds_are_checked(done: int, olds: object, code: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        Result(7, 0, done, olds)  # type: ignore[arg-type]
    assert info.value.code == code
