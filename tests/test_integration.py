"""Two real processes: ``pvemu hypervisor`` as a subprocess, guests over its socket."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import msgpack
import pytest
import trio

from pvemu.guest.client import Domain, connect
from pvemu.shared import abi, wire
from pvemu.shared.x86 import _PAGE_DIRTY, _PAGE_RW, PTE_MFN_MASK, maddr_of_entry, make_pte
from tests.hvproc import HypervisorProcess, hypervisor_process

USER_RW = 0x7
USER_RO = 0x5


@pytest.fixture(scope="module")
def hvp() -> Iterator[HypervisorProcess]:
    with hypervisor_process(tag="it") as process:
        yield process


def child(domain: Domain, maddr: int) -> int:
    return (domain.read_u64(maddr) & PTE_MFN_MASK) >> 12


def first_l1(domain: Domain) -> int:
    l3 = child(domain, maddr_of_entry(domain.l4_mfn, 0))
    l2 = child(domain, maddr_of_entry(l3, 0))
    return child(domain, maddr_of_entry(l2, 0))


async def test_boot_builds_a_pinned_tree(hvp: HypervisorProcess) -> None:
    async with connect(hvp.socket_path, memory_mib=4, vcpus=2) as dom:
        assert dom.domid > 0
        assert len(dom.p2m) == 4 * 256
        assert dom.l4_mfn in dom.p2m
        assert abi.XENFEAT_mmu_pt_update_preserve_ad in dom.features
        # the reserved L4 slots hold Xen's entries, readable without a trap
        assert dom.read_u64(maddr_of_entry(dom.l4_mfn, 256)) & 1
        assert await dom.audit() == []


async def test_mmu_update_valid_and_invalid(hvp: HypervisorProcess) -> None:
    async with connect(hvp.socket_path, memory_mib=4, vcpus=2) as dom:
        l1 = first_l1(dom)
        data = dom.alloc_frame()
        assert await dom.mmu_update([(maddr_of_entry(l1, 1), make_pte(data, USER_RW))]) == (0, 1)
        outcome = await dom.run_user(1, [(4096, "w", b"hello"), (4096, "r", 5)])
        assert outcome == {"executed": 2, "reads": [b"hello"], "fault": None}
        assert dom.read_bytes(data << 12, 5) == b"hello"
        pte = dom.read_u64(maddr_of_entry(l1, 1))
        assert pte & _PAGE_DIRTY
        # PRESERVE_AD keeps the D the hardware set
        ro = maddr_of_entry(l1, 1) | abi.MMU_PT_UPDATE_PRESERVE_AD
        assert await dom.mmu_update([(ro, make_pte(data, USER_RO))]) == (0, 1)
        assert dom.read_u64(maddr_of_entry(l1, 1)) & _PAGE_DIRTY
        # a writable mapping of a page table: -EBUSY, the first request stays
        bad = [
            (maddr_of_entry(l1, 2), make_pte(data, USER_RO)),
            (maddr_of_entry(l1, 3), make_pte(l1, USER_RW)),
        ]
        assert await dom.mmu_update(bad) == (-abi.EBUSY, 1)
        assert dom.read_u64(maddr_of_entry(l1, 3)) == 0
        assert await dom.mmu_update([(maddr_of_entry(dom.l4_mfn, 260), 0)]) == (-abi.EINVAL, 0)
        assert await dom.mmu_update([(maddr_of_entry(l1, 4) | 6, 0)]) == (-abi.ENOSYS, 0)
        assert await dom.raw_hypercall(12, 1, 2) == -abi.ENOSYS
        results = await dom.multicall(
            [
                (abi.HYPERVISOR_mmu_update, [(maddr_of_entry(l1, 5), make_pte(data, USER_RO))]),
                (abi.HYPERVISOR_multicall, []),
                (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_INVLPG_LOCAL, 4096, 0)]),
            ]
        )
        assert results == [0, -abi.EINVAL, 0]
        rc = await dom.update_va_mapping(4096, make_pte(data, USER_RW), abi.UVMF_INVLPG)
        assert rc == 0
        assert await dom.ptwr_write(maddr_of_entry(l1, 1), make_pte(data, USER_RO)) == 0
        assert not dom.read_u64(maddr_of_entry(l1, 1)) & _PAGE_RW
        assert await dom.audit() == []


async def test_domains_are_isolated(hvp: HypervisorProcess) -> None:
    async with (
        connect(hvp.socket_path, memory_mib=2) as a,
        connect(hvp.socket_path, memory_mib=2) as b,
    ):
        assert not set(a.p2m) & set(b.p2m)
        with pytest.raises(KeyError):
            a.read_u64(b.p2m[0] << 12)  # not in a's memory at all
        l1 = first_l1(a)
        target = b.alloc_frame()
        assert await a.mmu_update([(maddr_of_entry(l1, 1), make_pte(target, USER_RO))]) == (
            -abi.EBUSY,
            0,
        )
        assert await a.mmu_update([(maddr_of_entry(first_l1(b), 1), 0)]) == (-abi.EINVAL, 0)
        assert await a.mmu_update([(maddr_of_entry(l1, 1), 0)], b.domid) == (-abi.EPERM, 0)
        assert await a.mmuext_op([(abi.MMUEXT_PIN_L1_TABLE, target, 0)]) == (-abi.EINVAL, 0)
        assert await b.audit() == []


async def test_guest_mapping_is_read_only_and_sealed(hvp: HypervisorProcess) -> None:
    async with connect(hvp.socket_path, memory_mib=2) as dom:
        fd = dom.memory_fd
        with pytest.raises(TypeError):
            dom._memory[0:1] = b"x"  # the guest's mapping is PROT_READ
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):  # F_SEAL_FUTURE_WRITE also refuses write(2)
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):  # and growing or shrinking
            os.ftruncate(fd, 4096)


async def test_garbage_on_one_connection_leaves_others_working(hvp: HypervisorProcess) -> None:
    async with connect(hvp.socket_path, memory_mib=2) as dom:
        # a well-formed message of an unknown type: typed error, connection lives
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(hvp.socket_path)
        await sock.send(msgpack.packb({"t": "frobnicate", "id": 3}))
        reply = msgpack.unpackb(await sock.recv(4096))
        assert reply["t"] == "error"
        assert (reply["id"], reply["code"]) == (3, "unknown_message")
        # a hypercall before hello: bad_state, still alive
        await sock.send(msgpack.packb({"t": "stats", "id": 4}))
        reply = msgpack.unpackb(await sock.recv(4096))
        assert reply["code"] == "bad_state"
        # corrupt bytes: an error, then the connection is closed
        await sock.send(b"\xc1\xc1\xc1\xc1")
        reply = msgpack.unpackb(await sock.recv(4096))
        assert reply["code"] == "malformed"
        assert await sock.recv(4096) == b""
        sock.close()
        # the other domain never noticed
        l1 = first_l1(dom)
        assert await dom.mmu_update([(maddr_of_entry(l1, 1), 0)]) == (0, 1)
        assert await dom.audit() == []


async def test_join_with_wrong_secret_and_second_hello(hvp: HypervisorProcess) -> None:
    async with connect(hvp.socket_path, memory_mib=2) as dom:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(hvp.socket_path)
        bad = {
            "t": "join",
            "id": 1,
            "version": wire.PROTOCOL_VERSION,
            "domid": dom.domid,
            "secret": b"x" * 16,
            "vcpu": 1,
        }
        await sock.send(msgpack.packb(bad))
        assert msgpack.unpackb(await sock.recv(4096))["code"] == "bad_secret"
        sock.close()
        # a second hello on a connection that already has a domain: bad_state
        raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await raw.connect(hvp.socket_path)
        hello = {
            "t": "hello",
            "id": 1,
            "version": wire.PROTOCOL_VERSION,
            "memory_mib": 1,
            "vcpus": 1,
            "name": "x",
        }
        await raw.send(msgpack.packb(hello))
        unpacker = msgpack.Unpacker()
        while True:
            data, ancdata, _, _ = await raw.recvmsg(1 << 20, socket.CMSG_SPACE(4))
            for _level, _kind, fd_bytes in ancdata:
                os.close(int.from_bytes(fd_bytes[:4], "little"))
            unpacker.feed(data)
            welcome = next(unpacker, None)
            if welcome is not None:
                break
        assert welcome["t"] == "welcome"
        await raw.send(msgpack.packb({**hello, "id": 2}))
        assert msgpack.unpackb(await raw.recv(4096))["code"] == "bad_state"
        raw.close()
        assert await dom.audit() == []


async def test_guest_and_hypervisor_trap_counts_agree_exactly(hvp: HypervisorProcess) -> None:
    async with connect(hvp.socket_path, memory_mib=2, vcpus=2) as dom:
        before = await dom.stats()
        l1 = first_l1(dom)
        frames = [dom.alloc_frame() for _ in range(8)]
        await dom.mmu_update(
            [(maddr_of_entry(l1, i + 1), make_pte(m, USER_RW)) for i, m in enumerate(frames)]
        )
        await dom.mmuext_op([(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)])
        await dom.multicall([(abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_INVLPG_LOCAL, 4096, 0)])] * 5)
        await dom.update_va_mapping(4096, make_pte(frames[0], USER_RO), abi.UVMF_INVLPG)
        await dom.ptwr_write(maddr_of_entry(l1, 2), make_pte(frames[1], USER_RO))
        await dom.run_user(1, [(4096, "w", b"x")])  # read-only now: one page fault
        await dom.run_user(1, [(3 * 4096, "r", 1)])  # mapped: no fault
        after = await dom.stats()
    guest = after["guest"]["total"]
    hyper = after["hypervisor"]["total"]
    assert guest["traps"] == hyper["traps"]
    assert hyper["traps"] - before["hypervisor"]["total"]["traps"] == 4 + 1 + 1
    assert hyper["page_faults"] == 1
    assert hyper["ptwr"] == 1
    assert hyper["multicall_entries"] == 5
    # boot: one mmu_update and one mmuext_op on vCPU 0, one NEW_BASEPTR on vCPU 1
    assert before["hypervisor"]["total"]["traps"] == before["guest"]["total"]["traps"] == 3


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: object) -> None:
    with hypervisor_process(tag="stale") as live:
        clash = subprocess.run(
            [sys.executable, "-m", "pvemu.scripts", "hypervisor", "--socket", live.socket_path],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert clash.returncode == 2  # a socket in use is the user's to fix (usage)
        assert clash.stderr.count("\n") == 1
        assert "already listening" in clash.stderr
        live.stop(signal.SIGKILL)  # leaves the socket file behind
        assert os.path.exists(live.socket_path)
        restart = subprocess.Popen(
            [sys.executable, "-m", "pvemu.scripts", "hypervisor", "--socket", live.socket_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert restart.stdout is not None
        assert restart.stdout.readline().startswith("pvemu-hypervisor ready")
        restart.send_signal(signal.SIGTERM)
        assert restart.wait(timeout=10) == 0
        restart.stdout.close()


async def test_a_16_gib_domain_boots_over_the_socket() -> None:
    """The p2m of a 16 GiB domain (4 Mi frames, 32 MiB) reaches the guest
    through the memfd's read-only tail, not a message; the guest maps a frame
    at the top of its memory and the hypervisor's audit is clean."""
    with hypervisor_process(memory_mib=wire.MAX_MEMORY_MIB + 64, tag="big") as big:
        async with connect(big.socket_path, memory_mib=wire.MAX_MEMORY_MIB, vcpus=2) as dom:
            assert len(dom.p2m) == wire.MAX_DOMAIN_FRAMES
            assert len(set(dom.p2m)) == wire.MAX_DOMAIN_FRAMES
            top = dom.p2m[-1]
            assert dom.pfn_of(top) == wire.MAX_DOMAIN_FRAMES - 1
            l1 = first_l1(dom)
            pte = make_pte(top, USER_RW)
            assert await dom.mmu_update([(maddr_of_entry(l1, 3), pte)]) == (0, 1)
            outcome = await dom.run_user(1, [(3 * 4096, "w", b"top"), (3 * 4096, "r", 3)])
            assert outcome["reads"] == [b"top"]
            assert dom.read_bytes(top << 12, 3) == b"top"
            assert await dom.audit() == []


async def test_mmu_xchg_over_the_socket(hvp: HypervisorProcess) -> None:
    """pvemu's exchange extension end to end: advertised in the Welcome, a
    whole PTE page cleared in one mmu_update whose reply carries the 512
    old entries (the hardware's D bit among them), counted on both sides."""
    async with connect(hvp.socket_path, memory_mib=4, vcpus=2) as dom:
        assert dom.has_feature(abi.XENFEAT_pvemu_mmu_pt_xchg)
        l1 = first_l1(dom)
        data = [dom.alloc_frame() for _ in range(4)]
        maps = [(maddr_of_entry(l1, 10 + i), make_pte(m, USER_RW)) for i, m in enumerate(data)]
        assert await dom.mmu_update(maps) == (0, 4)
        outcome = await dom.run_user(1, [(12 * 4096, "w", b"dirty")])
        assert outcome["fault"] is None
        seen = [dom.read_u64(maddr_of_entry(l1, i)) for i in range(512)]
        assert seen[12] & _PAGE_DIRTY
        before = await dom.stats()
        rc, olds = await dom.mmu_xchg([(maddr_of_entry(l1, i), 0) for i in range(512)])
        assert rc == 0
        assert olds == seen
        assert all(dom.read_u64(maddr_of_entry(l1, i)) == 0 for i in range(512))
        after = await dom.stats()
        for side in ("guest", "hypervisor"):
            moved = {
                k: after[side]["total"][k] - before[side]["total"][k]
                for k in ("traps", "hypercalls", "mmu_update_records", "mmu_xchg_records")
            }
            assert moved == {
                "traps": 1,
                "hypercalls": 1,
                "mmu_update_records": 512,
                "mmu_xchg_records": 512,
            }, side
        assert after["hypervisor"]["hardware"]["lost_dirty"] == 0
        assert await dom.audit() == []
