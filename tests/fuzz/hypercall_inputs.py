"""Hypercall-fuzzer inputs: what they aim at (:class:`DomainView`,
:class:`VcpuLink`) and :class:`RequestMaker`, which turns entropy into valid
(and sometimes invalid) requests targeted at a booted machine's frames,
entries, addresses and domains."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.service import Session, Work
from pvemu.shared import abi, wire
from pvemu.shared.wire import (
    Access,
    Audit,
    Call,
    Connection,
    Hypercall,
    KernelWrite,
    MmuUpdateArgs,
    MulticallArgs,
    Ptwr,
    RawArgs,
    Request,
    RunUser,
    Stats,
    VmAssistArgs,
)
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_AVAIL,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_GUEST_KERNEL,
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PCD,
    _PAGE_PRESENT,
    _PAGE_PWT,
    _PAGE_RW,
    _PAGE_USER,
    LINEAR_MAP_BASE,
    PAGE_SIZE,
    PTE_MFN_MASK,
    maddr_of_entry,
    make_pte,
)
from tests.fuzz.entropy import U16, U32, U64, Entropy
from tests.fuzz.messages import FOREIGNDOM_MAX, unknown_op
from tests.support import USER_RW, Guest

HUGE_MFNS: Final = (1 << 40) - 1, 1 << 40, (1 << 52) - 1
FLAG_CHOICES: Final = (
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER,
    0,
    _PAGE_PRESENT,
    _PAGE_PRESENT | _PAGE_USER,
    _PAGE_PRESENT | _PAGE_RW,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY,
    _PAGE_PRESENT | _PAGE_USER | _PAGE_NX,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_GLOBAL,
    _PAGE_RW | _PAGE_DIRTY,
)
EXTRA_FLAGS: Final = (
    _PAGE_PWT,
    _PAGE_PCD,
    _PAGE_PAT,  # also _PAGE_PSE in upper levels
    _PAGE_GLOBAL,
    _PAGE_NX,
    _PAGE_AVAIL,
    _PAGE_GUEST_KERNEL,
    0x7FF << 52,
    _PAGE_ACCESSED | _PAGE_DIRTY,
)
SLOTS: Final = (0, 1, 2, 3, 7, 255, 256, 257, 270, 271, 272, 511)
#: Bits flipped in an entry's current value.
TWEAKS: Final = (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_ACCESSED | _PAGE_DIRTY,
    _PAGE_RW,
    _PAGE_USER,
    _PAGE_NX,
    _PAGE_GLOBAL,
    _PAGE_AVAIL,
    _PAGE_PRESENT,
    _PAGE_PWT,
    _PAGE_PAT,
)
MMU_CMDS: Final = (0, 0, 0, 0, 2, 2, 2, 1, 3, 4, 5, 6, 7)
VAS: Final = (
    0,
    0x1000,
    0x2000,
    0x3000,
    0x7000,
    0x8000,
    0x1FF000,
    0x200000,
    1 << 30,
    1 << 39,
    (1 << 47) - PAGE_SIZE,
    1 << 47,
    abi.HYPERVISOR_VIRT_START,
    abi.HYPERVISOR_VIRT_END,
    abi.HYPERVISOR_VIRT_END - PAGE_SIZE,
    U64 - PAGE_SIZE + 1,
    0xFFFF_FFFF_8000_0000,
)
FOREIGN: Final = ("self",) * 40 + ("own", "other", "io", "xen", "cow", "none", "zero", "u16")
MMUEXT_CMDS: Final = (
    abi.MMUEXT_PIN_L1_TABLE,
    abi.MMUEXT_PIN_L2_TABLE,
    abi.MMUEXT_PIN_L3_TABLE,
    abi.MMUEXT_PIN_L4_TABLE,
    abi.MMUEXT_UNPIN_TABLE,
    abi.MMUEXT_UNPIN_TABLE,
    abi.MMUEXT_NEW_BASEPTR,
    abi.MMUEXT_NEW_BASEPTR,
    abi.MMUEXT_NEW_USER_BASEPTR,
    abi.MMUEXT_TLB_FLUSH_LOCAL,
    abi.MMUEXT_INVLPG_LOCAL,
    abi.MMUEXT_TLB_FLUSH_MULTI,
    abi.MMUEXT_INVLPG_MULTI,
    abi.MMUEXT_TLB_FLUSH_ALL,
    abi.MMUEXT_INVLPG_ALL,
    abi.MMUEXT_FLUSH_CACHE,
    abi.MMUEXT_SET_LDT,
    abi.MMUEXT_CLEAR_PAGE,
    abi.MMUEXT_CLEAR_PAGE,
    abi.MMUEXT_COPY_PAGE,
    abi.MMUEXT_COPY_PAGE,
    abi.MMUEXT_FLUSH_CACHE_GLOBAL,
    abi.MMUEXT_MARK_SUPER,
    abi.MMUEXT_UNMARK_SUPER,
    14,
    21,
    U32,
)
_FRAME_CMDS: Final = frozenset(
    {
        abi.MMUEXT_PIN_L1_TABLE,
        abi.MMUEXT_PIN_L2_TABLE,
        abi.MMUEXT_PIN_L3_TABLE,
        abi.MMUEXT_PIN_L4_TABLE,
        abi.MMUEXT_UNPIN_TABLE,
        abi.MMUEXT_NEW_BASEPTR,
        abi.MMUEXT_NEW_USER_BASEPTR,
        abi.MMUEXT_CLEAR_PAGE,
        abi.MMUEXT_COPY_PAGE,
    }
)
#: Weighted request kinds; index 0 is a plain mmu_update.
HC_KINDS: Final = (
    ("mmu",) * 30
    + ("remap",) * 6
    + ("ext",) * 20
    + ("uvm",) * 12
    + ("multicall",) * 12
    + ("assist",) * 3
    + ("unknown",) * 3
    + ("ptwr",) * 10
    + ("kernel_write",) * 3
    + ("user",) * 7
    + ("stats",) * 2
    + ("big",) * 1
    + ("invalid",) * 5
)
#: Multicall entries: the hypercall kinds only.
CALL_KINDS: Final = tuple(
    k for k in HC_KINDS if k in ("mmu", "remap", "ext", "uvm", "multicall", "assist", "unknown")
)


@dataclass
class DomainView:
    """A booted guest and the frames worth aiming at."""

    guest: Guest
    tables: list[int]
    hot: list[int]
    frames: list[int]

    @classmethod
    def of(cls, guest: Guest) -> DomainView:
        tables = [guest.l4, guest.l3, guest.l2, guest.l1]
        hot = tables + guest.data + guest.spare[-16:]
        return cls(guest, tables, hot, list(guest.dom.p2m))

    @property
    def domid(self) -> int:
        return self.guest.domid


@dataclass
class VcpuLink:
    """One vCPU's connection pair (as pvemu's server has one per vCPU) and
    the hypercall it is running, if any."""

    me: DomainView
    other: DomainView
    vcpu: int
    client: Connection
    server: Connection
    session: Session
    next_id: int = 1
    work: Work | None = None
    request: Request | None = None
    #: this vCPU's latest entry in HypercallRun.trace
    entry: list[object] = field(default_factory=list)


class RequestMaker:
    """Requests for one example's machine, every choice read from ``e``."""

    def __init__(self, e: Entropy, hv: Hypervisor, free: list[int], oob: list[int]) -> None:
        self.e = e
        self.hv = hv
        #: frames nobody owns, and frame numbers past the end of memory
        self.free = free
        self.oob = oob
        #: set when the request being built must be refused by the wire types
        self.invalid = False

    # -- targets --

    def frame(self, link: VcpuLink) -> int:
        e = self.e
        k = e.byte()
        if k < 110:
            return e.pick(link.me.hot)
        if k < 140:
            return e.pick(link.me.tables)
        if k < 155:
            return e.pick(link.me.frames)
        if k < 190:
            return e.pick(link.other.hot if k < 180 else link.other.tables)
        if k < 205:
            return self.hv.xen_mfn
        if k < 220:
            return e.pick(self.free)
        if k < 240:
            return e.pick(self.oob)
        return e.bits(40)

    def pte(self, link: VcpuLink, at: int | None = None) -> int:
        """A PTE value; with ``at`` (an entry's address) sometimes that
        entry's current value with one bit flipped (fast paths, A/D merges)."""
        e = self.e
        k = e.byte()
        if k >= 240:
            return e.u64()
        if at is not None and k < 48:
            try:
                return self.hv.state.memory.read_u64(at & ~7) ^ e.pick(TWEAKS)
            except (IndexError, KeyError):
                pass
        flags = e.pick(FLAG_CHOICES)
        if e.byte() >= 200:
            flags |= e.pick(EXTRA_FLAGS)
        return ((self.frame(link) << 12) & PTE_MFN_MASK) | flags

    def ptr(self, link: VcpuLink) -> int:
        e = self.e
        if e.byte() >= 245:
            return e.u64()
        return ((self.frame(link) << 12) + e.pick(SLOTS) * 8 + e.pick(MMU_CMDS)) & U64

    def linear(self, link: VcpuLink) -> tuple[int, int]:
        """(va, pte) for update_va_mapping of the kernel's linear map: the
        address of a frame's pfn (sometimes just past the domain), mapping
        that frame read-only or writable, or any PTE."""
        e = self.e
        ft = self.hv.state.frames
        mfn = self.frame(link)
        pfn = ft.slot[mfn] if ft.valid(mfn) else e.below(1 << 12)
        va = LINEAR_MAP_BASE + ((pfn + e.pick((0, 0, 0, 1, 256))) << 12)
        if e.chance(25):
            return va & U64, self.pte(link)
        flags = e.pick((_PAGE_PRESENT | _PAGE_ACCESSED, _PAGE_PRESENT | _PAGE_RW | _PAGE_DIRTY))
        return va & U64, ((mfn << 12) & PTE_MFN_MASK) | flags | e.pick((0, _PAGE_NX, _PAGE_PAT))

    def va(self) -> int:
        e = self.e
        k = e.byte()
        if k < 150:
            return e.pick(VAS)
        if k < 200:
            return e.below(512) << 12
        if k < 230:
            return e.pick(VAS) + e.below(PAGE_SIZE)
        return e.u64()

    def user_va(self) -> int:
        """Mostly pages the booted L1 can map (where updates aim), so user
        accesses hit the TLB, set A/D and catch stale translations."""
        e = self.e
        k = e.byte()
        base = e.below(8) << 12 if k < 160 else e.pick(SLOTS) << 12 if k < 220 else self.va()
        return (base + e.pick((0, 0, 0, 8, 100, PAGE_SIZE - 4, PAGE_SIZE - 1))) & U64

    def foreigndom(self, link: VcpuLink, pfd: bool = False) -> int:
        """An FD (data-frame owner); for mmu_update sometimes with a PFD
        (page-table owner + 1 in bits 16-31) when the wire carries one."""
        e = self.e
        if pfd and FOREIGNDOM_MAX > U16 and e.chance(10):
            owner = e.pick((link.me.domid, link.other.domid, abi.DOMID_SELF, 999, U16 - 1))
            return ((owner + 1) << 16) | self.foreigndom(link)
        which = e.pick(FOREIGN)
        return {
            "self": abi.DOMID_SELF,
            "own": link.me.domid,
            "other": link.other.domid,
            "io": abi.DOMID_IO,
            "xen": abi.DOMID_XEN,
            "cow": abi.DOMID_COW,
            "none": 999,
            "zero": 0,
            "u16": U16,
        }[which]

    def mask(self) -> int:
        return self.e.pick((1, 0, 2, 3, U64, 1 << 63, 0x5))

    # -- requests --

    def mmuext_op(self, link: VcpuLink) -> tuple[int, int, int]:
        e = self.e
        cmd = e.pick(MMUEXT_CMDS)
        arg1 = self.frame(link) if cmd in _FRAME_CMDS and e.byte() < 230 else self.va()
        if cmd == abi.MMUEXT_NEW_USER_BASEPTR and e.chance(20):
            arg1 = 0
        if cmd == abi.MMUEXT_COPY_PAGE:
            arg2 = self.frame(link)
        elif cmd in (abi.MMUEXT_TLB_FLUSH_MULTI, abi.MMUEXT_INVLPG_MULTI):
            arg2 = self.mask()
        elif cmd == abi.MMUEXT_SET_LDT:
            arg2 = e.pick((0, 1, 8192, 8193, U64))
        else:
            arg2 = 0 if e.byte() < 200 else e.u64()
        return (cmd, arg1, arg2)

    def call(self, link: VcpuLink, depth: int, kind: str | None = None) -> Call:
        """A valid hypercall aimed at this machine's frames and addresses."""
        e = self.e
        kind = kind or e.pick(CALL_KINDS)
        if kind == "mmu":
            n = e.pick((1, 1, 2, 3, 4, 8, 16, 0, 31))
            flat = []
            for _ in range(n):
                ptr = self.ptr(link)
                flat += [ptr, self.pte(link, ptr)]
            return wire.make_call(
                abi.HYPERVISOR_mmu_update, wire.pack_u64s(flat), self.foreigndom(link, pfd=True)
            )
        if kind == "remap":
            return self.remap(link, depth)
        if kind == "ext":
            ops = tuple(self.mmuext_op(link) for _ in range(e.pick((1, 1, 2, 3, 8, 0))))
            return wire.make_call(abi.HYPERVISOR_mmuext_op, ops, self.foreigndom(link))
        if kind == "uvm":
            flags = e.below(8) | (self.mask() << 3 if e.chance(30) else 0)
            if e.chance(5):
                flags = e.u64()
            va = self.user_va() if e.flag() else self.va()
            pte = self.pte(link)
            if e.chance(25):  # the kernel's linear map: a frame's pfn, often that frame
                va, pte = self.linear(link)
            if e.chance(25):  # the _otherdomain form (-ENOSYS where not implemented)
                op = abi.HYPERVISOR_update_va_mapping_otherdomain
                domid = self.foreigndom(link)
                return wire.make_call(op, va, pte, flags & U64, domid)
            return wire.make_call(abi.HYPERVISOR_update_va_mapping, va, pte, flags & U64)
        if kind == "assist":
            cmd = e.pick((abi.VMASST_CMD_enable, abi.VMASST_CMD_disable, 2, U32))
            typ = e.pick(
                (abi.VMASST_TYPE_writable_pagetables, abi.VMASST_TYPE_m2p_strict, 0, 1, U32)
            )
            return wire.make_call(abi.HYPERVISOR_vm_assist, cmd, typ)
        if kind == "multicall" and depth < 2:
            calls = tuple(self.call(link, depth + 1) for _ in range(e.pick((2, 1, 3, 4, 8, 0))))
            return Call(abi.HYPERVISOR_multicall, MulticallArgs(calls))
        return wire.make_call(unknown_op(e), *(e.u64() for _ in range(e.below(7))))

    def remap(self, link: VcpuLink, depth: int) -> Call:
        """What a guest does all the time: (re)link its tree and map data
        pages, in any order, NORMAL or PRESERVE_AD; sometimes reload CR3.
        Without it the first unlink leaves every user access faulting."""
        e = self.e
        g = link.me.guest
        cmd = e.pick((abi.MMU_NORMAL_PT_UPDATE, abi.MMU_PT_UPDATE_PRESERVE_AD))
        pairs = [
            (maddr_of_entry(g.l4, 0), make_pte(g.l3, USER_RW)),
            (maddr_of_entry(g.l3, 0), make_pte(g.l2, USER_RW)),
            (maddr_of_entry(g.l2, 0), make_pte(g.l1, USER_RW)),
        ]
        for _ in range(e.pick((2, 1, 4, 8))):
            i = e.below(len(g.data))
            flags = e.pick((USER_RW, USER_RW, _PAGE_PRESENT | _PAGE_USER, USER_RW | _PAGE_NX))
            pairs.append((maddr_of_entry(g.l1, i), make_pte(e.pick(g.data), flags)))
        order = sorted(range(len(pairs)), key=lambda _: e.byte())
        flat = [v for i in order for v in (pairs[i][0] | cmd, pairs[i][1])]
        update = wire.make_call(abi.HYPERVISOR_mmu_update, wire.pack_u64s(flat))
        if depth or not e.chance(30):
            return update
        reload = wire.make_call(abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_NEW_BASEPTR, g.l4, 0)])
        return Call(abi.HYPERVISOR_multicall, MulticallArgs((update, reload)))

    def big(self, link: VcpuLink) -> Call:
        """A batch near the wire limits, filled by a PRNG seeded from the blob."""
        rng = random.Random(self.e.bits(32))
        me = link.me
        if self.e.flag():
            n = rng.randint(257, wire.MAX_MULTICALL_CALLS)
            calls = []
            for _ in range(n):
                if rng.random() < 0.8:
                    op = rng.randrange(43, 1 << 32)
                    calls.append(Call(op, RawArgs((rng.getrandbits(64),))))
                else:
                    args = VmAssistArgs(rng.choice((0, 1)), abi.VMASST_TYPE_m2p_strict)
                    calls.append(Call(abi.HYPERVISOR_vm_assist, args))
            return Call(abi.HYPERVISOR_multicall, MulticallArgs(tuple(calls)))
        n = rng.randint(256, 2048)
        flat: list[int] = []
        for _ in range(n):
            slot = rng.randrange(512)
            target = rng.choice(me.hot)
            flat += [
                (rng.choice(me.hot) << 12) | slot << 3 | rng.choice((0, 2)),
                (target << 12) | 0x67,
            ]
        return wire.make_call(abi.HYPERVISOR_mmu_update, wire.pack_u64s(flat), abi.DOMID_SELF)

    def accesses(self, link: VcpuLink) -> tuple[Access, ...]:
        e = self.e
        out = []
        for _ in range(e.pick((1, 2, 3, 8))):
            kind = e.pick(("r", "w", "x"))
            length = (
                e.pick((1, 8, 64, PAGE_SIZE, 4095, 2)) if e.byte() < 220 else e.int_range(1, 4096)
            )
            va = self.user_va()
            data: bytes | int = e.blob(length) if kind == "w" else length
            out.append(Access(va & U64, kind, data))
        return tuple(out)

    def invalid_request(self, link: VcpuLink, rid: int) -> Request:
        """A request the wire types must refuse to build (LocalProtocolError)."""
        e = self.e
        self.invalid = True
        k = e.below(16)
        if k == 0:
            return Hypercall(rid, 1, MmuUpdateArgs(b"\0" * e.pick((1, 8, 17, 24)), abi.DOMID_SELF))
        if k == 1:
            return Hypercall.make(rid, e.pick((1, 26)), b"", e.pick((1 << 32, -1)))
        if k == 2:
            return Hypercall.make(rid, 26, [(e.pick((U32 + 1, -1)), 0, 0)])
        if k == 3:
            return Hypercall.make(rid, 26, [(0, 0)])
        if k == 4:
            return Hypercall.make(rid, 14, 0, e.pick((U64 + 1, -1)), 0)
        if k == 5:
            return Hypercall.make(rid, 21, U32 + 1, 2)
        if k == 6:
            return Hypercall.make(rid, unknown_op(e), *([0] * 7))
        if k == 7:
            return Hypercall.make(rid, unknown_op(e), -1)
        if k == 8:
            inner = Call(13, MulticallArgs((Call(13, MulticallArgs(())),)))
            return Hypercall(rid, 13, MulticallArgs((inner,)))
        if k == 9:
            return Hypercall(rid, 1, RawArgs((1, 2)))
        if k == 10:
            return Ptwr(rid, e.pick((U64 + 1, -1)), 0)
        if k == 11:
            return Ptwr(rid, 0, 0, 1)  # type: ignore[arg-type]
        if k == 12:
            bad = e.pick(
                (Access(0, "r", 0), Access(0, "q", 1), Access(0, "x", 4097), Access(0, "w", b""))
            )
            return RunUser(rid, (bad,))
        if k == 13:
            return Ptwr(rid, 0, e.int_range(1, U64), False, e.int_range(1, U64))  # val with clear
        if k == 14:
            offset = e.int_range(1, PAGE_SIZE - 1)
            return KernelWrite(rid, offset, bytes(PAGE_SIZE - offset + 1))  # crosses a frame
        return Stats(e.pick((-1, 1 << 63)))

    def request(self, link: VcpuLink, rid: int) -> Request:
        e = self.e
        kind = e.pick(HC_KINDS)
        if kind == "ptwr":
            maddr = (self.frame(link) << 12) + e.pick(SLOTS) * 8
            if e.chance(5):
                maddr += e.below(8)
            if e.chance(20):  # an atomic clear of PTE bits (ptep_set_wrprotect's lock btr)
                bits = e.pick((0x2, 0x40, 0x42, 0x1, 0x63)) if e.flag() else e.u64()
                return Ptwr(rid, maddr & U64, 0, e.flag(), bits)
            return Ptwr(rid, maddr & U64, self.pte(link, maddr), e.flag())
        if kind == "kernel_write":
            offset = e.pick((0, 8, 0xFF8, 0x800)) if e.flag() else e.below(PAGE_SIZE)
            length = (
                e.int_range(1, PAGE_SIZE - offset) if e.chance(10) else min(8, PAGE_SIZE - offset)
            )
            maddr = ((self.frame(link) << 12) + offset) & U64
            return KernelWrite(rid, maddr, e.blob(length))
        if kind == "user":
            # resume (an iret) is refused on a vCPU with no fault pending
            return RunUser(rid, self.accesses(link), e.chance(30))
        if kind == "stats":
            return Audit(rid) if e.chance(15) else Stats(rid)
        if kind == "invalid":
            return self.invalid_request(link, rid)
        call = self.big(link) if kind == "big" else self.call(link, 0, kind)
        return Hypercall(rid, call.op, call.args)
