"""The hypercall-argument fuzzer: :class:`HypercallRun` boots two domains
on an in-process hypervisor and serves :class:`RequestMaker`'s requests
through ``HypervisorService`` as pvemu's server does (wire round trip,
``Work`` stepped in random slices, reply round trip), checking results,
``audit()`` and frame accounting; :func:`hypercall_fuzzer` wraps
:func:`run_hypercalls` as a hypothesis test."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.frametable import NO_OWNER
from pvemu.hypervisor.limits import ServerLimits
from pvemu.hypervisor.service import FEATURES, HypervisorService, Session
from pvemu.shared import abi
from pvemu.shared.errors import LocalProtocolError
from pvemu.shared.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    AuditResult,
    Call,
    Connection,
    ErrorReply,
    Hello,
    Hypercall,
    Join,
    KernelWrite,
    KernelWriteResult,
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
    UserResult,
    Welcome,
)
from tests.fuzz.bookkeeping import (
    HYPERCALL,
    STATS,
    SUITE_PROFILE,
    count_example,
    count_input,
    counted_run,
)

# The hypothesis test below keeps its original spelling (``_profile``,
# ``_example``): a derandomized run seeds itself from the test's source text,
# so renaming them would change what the suite generates.
from tests.fuzz.bookkeeping import example_scope as _example
from tests.fuzz.bookkeeping import profile_settings as _profile
from tests.fuzz.entropy import Entropy, FuzzFailure, escaped
from tests.fuzz.hypercall_inputs import HUGE_MFNS, DomainView, RequestMaker, VcpuLink
from tests.fuzz.messages import KNOWN_OPS
from tests.support import boot

#: Slice budgets for Work.step; None runs the call to its end.
BUDGETS: Final = (None, None, 1, 2, 3, 5, 8, 64)
#: Requests per example: hypothesis draws 1..this (about half on average).
HC_MAX_REQUESTS: Final = 400
#: The limits pvemu's server runs with by default (batch size, message size).
SERVER_LIMITS: Final = ServerLimits()
ERRNOS: Final = frozenset(abi.ERRNO_NAMES)


def describe(item: object) -> str:
    """A request for a failure report: mmu_update records as hex pairs."""
    if isinstance(item, Hypercall):
        return f"Hypercall(id={item.id}, {describe(Call(item.op, item.args))})"
    if isinstance(item, Call):
        args = item.args
        name = abi.HYPERCALL_NAMES.get(item.op, f"op {item.op}")
        if isinstance(args, MmuUpdateArgs):
            pairs = ", ".join(f"({p:#x}, {v:#x})" for p, v in args.pairs()[:12])
            more = " ..." if args.count > 12 else ""
            return f"{name}([{pairs}{more}], fd={args.foreigndom:#x})"
        if isinstance(args, MmuextOpArgs):
            ops = ", ".join(f"({c}, {a:#x}, {b:#x})" for c, a, b in args.ops[:12])
            return f"{name}([{ops}], fd={args.foreigndom:#x})"
        if isinstance(args, MulticallArgs):
            calls = "; ".join(describe(c) for c in args.calls[:12])
            more = f" ... {len(args.calls)} calls" if len(args.calls) > 12 else ""
            return f"{name}[{calls}{more}]"
        return f"{name}{args.to_wire()!r}"
    return repr(item)


class HypercallRun:
    """One example: a machine with two booted domains, then requests."""

    def __init__(self, e: Entropy, machine_seed: int) -> None:
        self.e = e
        self.stats = STATS[HYPERCALL]
        self.hv = hv = Hypervisor(3, seed=machine_seed)
        self.service = HypervisorService(hv, SERVER_LIMITS)
        self.nr_frames = hv.state.frames.nr_frames
        a = DomainView.of(boot(hv, memory_mib=1, vcpus=2, mapped=8))
        b = DomainView.of(boot(hv, memory_mib=1, vcpus=2, mapped=8))
        owner = hv.state.frames.owner
        free = [m for m in range(self.nr_frames) if owner[m] == NO_OWNER][:8]
        oob = [self.nr_frames, self.nr_frames + 1, *HUGE_MFNS]
        self.make = RequestMaker(e, hv, free, oob)
        self.links = [self._link(me, other, v) for me, other in ((a, b), (b, a)) for v in (0, 1)]
        #: [who, request, outcome] of the latest requests; outcome "..." while running
        self.trace: deque[list[object]] = deque(maxlen=10)
        self.requests = 0

    def _link(self, me: DomainView, other: DomainView, vcpu: int) -> VcpuLink:
        dom = me.guest.dom
        client = Connection("client")
        server = Connection("server", max_message_size=SERVER_LIMITS.message_size)
        hello: Request = (
            Hello(0, PROTOCOL_VERSION, 1, dom.nr_vcpus)
            if vcpu == 0
            else Join(0, PROTOCOL_VERSION, dom.domid, dom.secret, vcpu)
        )
        server.receive_data(client.send(hello))
        server.next_event()
        welcome = Welcome(0, dom.domid, vcpu, len(dom.p2m), dom.secret, {}, FEATURES)
        client.receive_data(server.send(welcome))
        assert client.next_event() == welcome
        return VcpuLink(me, other, vcpu, client, server, Session(dom.domid, vcpu))

    def context(self) -> str:
        lines = "\n  ".join(
            f"{who}: {describe(req)} -> {out!r}"[:600] for who, req, out in self.trace
        )
        return f"last requests (oldest first):\n  {lines}"

    def fail(self, message: str, signature: str) -> FuzzFailure:
        return FuzzFailure(f"{message}\n{self.context()}", signature)

    # -- running them as pvemu's server does --

    def issue(self, link: VcpuLink) -> None:
        rid = link.next_id
        link.next_id += 1
        count_input(HYPERCALL)
        self.requests += 1
        self.make.invalid = False
        try:
            request = self.make.request(link, rid)
        except LocalProtocolError as exc:
            if not self.make.invalid:
                raise self.fail(
                    f"a valid request was refused: {exc!r}", "valid request refused"
                ) from exc
            self.stats["refused at construction"] += 1
            self.trace.append([f"dom{link.me.domid}.{link.vcpu}", "invalid", exc])
            return
        except Exception as exc:
            raise escaped("building a wire request", exc, self.context()) from exc
        if self.make.invalid:
            raise self.fail(
                f"the wire types accepted {request!r}", f"accepted invalid {type(request).__name__}"
            )
        try:
            link.server.receive_data(link.client.send(request))
            decoded = link.server.next_event()
            after = link.server.next_event()
        except Exception as exc:
            raise escaped(
                "wire round trip of a request", exc, f"{request!r}\n{self.context()}"
            ) from exc
        if decoded != request or after is not NEED_DATA:
            raise self.fail(f"sent {request!r}, server decoded {decoded!r}", "request round trip")
        link.entry = [f"dom{link.me.domid}.{link.vcpu}", request, "..."]
        self.trace.append(link.entry)
        link.work = self.service.begin(link.session, request)
        link.request = request
        self.step(link, self.e.pick(BUDGETS))

    def step(self, link: VcpuLink, budget: int | None) -> None:
        """Serve a slice of the request as pvemu's server does (through the
        hypervisor service); an INTERNAL reply is a crash."""
        work, request = link.work, link.request
        assert work is not None
        assert request is not None
        if not work.step(budget):
            self.stats["preempted slices"] += 1
            return
        link.work = link.request = None
        reply = work.reply
        assert reply is not None
        if work.error is not None:
            raise escaped(
                f"INTERNAL: {type(request).__name__}", work.error, f"{request!r}\n{self.context()}"
            ) from work.error
        if isinstance(reply, ErrorReply):
            self.stats[f"{reply.code} replies"] += 1
        elif isinstance(reply, Result):
            assert isinstance(request, Hypercall)
            self.check_result(request, reply.rc, reply.done, ())
            self.check_olds(request, reply)
        elif isinstance(reply, MulticallResult):
            assert isinstance(request, Hypercall)
            self.check_result(request, reply.rc, 0, reply.results)
        self.finish(link, request, reply)

    def check_result(
        self, request: Hypercall, rc: int, done: int, results: tuple[int, ...]
    ) -> None:
        """Xen's return conventions (a well-formed reply is also a sane one)."""
        self.stats["rc=0" if rc == 0 else f"rc={abi.errno_name(rc)}"] += 1
        args = request.args
        ok = rc == 0 or (rc < 0 and -rc in ERRNOS)
        if isinstance(args, MmuUpdateArgs | MmuextOpArgs):
            count = args.count if isinstance(args, MmuUpdateArgs) else len(args.ops)
            ok = (
                ok
                and 0 <= done <= count
                and (done == count if rc == 0 else done < count or count == 0)
            )
        elif isinstance(args, MulticallArgs):
            ok = ok and rc == 0 and len(results) == len(args.calls)
            for sub, res in zip(args.calls, results, strict=False):
                if sub.op == abi.HYPERVISOR_multicall:
                    ok = ok and res == -abi.EINVAL
                elif sub.op not in KNOWN_OPS:
                    ok = ok and res == -abi.ENOSYS
                else:
                    ok = ok and (res == 0 or (res < 0 and -res in ERRNOS))
        elif isinstance(args, RawArgs):
            ok = ok and rc == -abi.ENOSYS and done == 0
        else:
            ok = ok and done == 0
        if not ok:
            raise self.fail(
                f"{request!r} returned rc={rc} done={done} results={results}", "bad result"
            )

    def check_olds(self, request: Hypercall, reply: Result) -> None:
        """One old entry per applied ``MMU_PT_XCHG_PVEMU`` record, none for
        any other call (pvemu's extension, docs/protocol.md §4.1)."""
        expected = 0
        if isinstance(request.args, MmuUpdateArgs):
            ptrs = request.args.records()[0 : 2 * reply.done : 2]
            expected = sum(ptr & abi.MMU_CMD_MASK == abi.MMU_PT_XCHG_PVEMU for ptr in ptrs)
        if len(reply.olds) != 8 * expected:
            raise self.fail(f"{request!r} -> {reply!r}: {expected} olds expected", "bad olds")

    def finish(self, link: VcpuLink, request: Request, reply: Reply) -> None:
        """Send the reply through the server Connection; the client must
        decode it back, equal."""
        if isinstance(reply, PtwrResult):
            assert isinstance(request, Ptwr)
            if (
                reply.rc > 0
                or (reply.rc and -reply.rc not in ERRNOS)
                or (reply.old and not (request.exchange or request.clear_bits))
            ):
                raise self.fail(f"{request!r} -> {reply!r}", "bad ptwr result")
        elif isinstance(reply, KernelWriteResult):
            assert isinstance(request, KernelWrite)
            if reply.rc not in (0, -abi.EFAULT):
                raise self.fail(f"{request!r} -> {reply!r}", "bad kernel_write result")
        elif isinstance(reply, UserResult):
            assert isinstance(request, RunUser)
            n = len(request.accesses)
            reads = sum(1 for a in request.accesses[: reply.executed] if a.kind == "r")
            if (reply.fault is None) != (reply.executed == n) or len(reply.reads) != reads:
                raise self.fail(f"{request!r} -> {reply!r}", "bad user result")
        elif isinstance(reply, AuditResult) and reply.violations:
            raise self.fail(f"audit mid-run: {reply.violations[:5]}", "audit violation mid-run")
        link.entry[2] = reply
        try:
            data = link.server.send(reply)
            link.client.receive_data(data)
            decoded = link.client.next_event()
            after = link.client.next_event()
        except Exception as exc:
            raise escaped(
                "wire round trip of a reply", exc, f"{reply!r}\n{self.context()}"
            ) from exc
        if decoded != reply or after is not NEED_DATA:
            raise self.fail(f"sent {reply!r}, client decoded {decoded!r}", "reply round trip")

    def check_machine(self, when: str) -> None:
        hv = self.hv
        problems = hv.audit()
        if problems:
            raise self.fail(f"audit {when}: {problems[:8]}", f"audit violation {when}")
        owner = hv.state.frames.owner
        owned = self.nr_frames - owner.count(NO_OWNER)
        expected = 1 + sum(len(d.p2m) for d in hv.domains.values())
        free = hv.state.memory.free_frames
        if owned != expected or owned + free != self.nr_frames:
            raise self.fail(
                f"{when}: {owned} frames owned, {expected} expected, "
                f"{free} free of {self.nr_frames}",
                "frames lost",
            )

    def run(self, count: int) -> None:
        e = self.e
        while self.requests < count:
            link = self.links[e.below(4)]
            if link.work is not None:
                self.step(link, e.pick(BUDGETS))
            else:
                self.issue(link)
        self.check_machine("after the requests")
        # Guests hang up one domain at a time; a call still running is
        # finished or abandoned (as when its connection drops mid-batch).
        order = [0, 2] if not e.flag() else [2, 0]
        for first in order:
            for link in self.links[first : first + 2]:
                if link.work is not None and e.flag():
                    link.work.abandon()
                    link.work = link.request = None
                    self.stats["abandoned"] += 1
                while link.work is not None:
                    self.step(link, None)
            self.hv.destroy_domain(self.links[first].me.domid)
            self.check_machine(f"after destroying dom{self.links[first].me.domid}")
        if self.hv.state.memory.free_frames != self.nr_frames - 1:
            raise self.fail("frames missing after every domain died", "frames lost")


def run_hypercalls(count: int, blob: bytes, machine_seed: int) -> None:
    HypercallRun(Entropy(blob), machine_seed).run(count)
    count_example(HYPERCALL)


def hypercall_fuzzer(
    profile: str | settings = SUITE_PROFILE, seed: int | None = None
) -> Callable[[], None]:
    """The hypercall-argument fuzz target under ``profile``."""

    @settings(_profile(profile))
    @given(
        count=st.integers(1, HC_MAX_REQUESTS),
        blob=st.binary(min_size=256, max_size=4096),
        machine_seed=st.integers(0, 3),
    )
    def fuzz_hypercalls(count: int, blob: bytes, machine_seed: int) -> None:
        with _example():
            run_hypercalls(count, blob, machine_seed)

    return counted_run(fuzz_hypercalls if seed is None else hypothesis_seed(seed)(fuzz_hypercalls))
