"""The in-process transport: the client's ``Domain`` over the hypervisor's
sans-I/O service in the same process, no socket (fast tests, and the
processing floor without the socket's cost).

Every request goes through :meth:`HypervisorService.begin` exactly as the
trio server sends it there, so what is counted is identical; only the bytes
and the slicing are missing (a call runs to its end in one step).
"""

from __future__ import annotations

import os

from pvemu.guest.boot import boot_domain
from pvemu.guest.client import Domain, HypervisorError, attach
from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.service import HypervisorService, Session
from pvemu.shared import wire


class LoopbackChannel:
    """One vCPU's session with the service."""

    def __init__(self, service: HypervisorService) -> None:
        self._service = service
        self._session = Session()
        self._next_id = 1
        self._fds: list[int] = []

    def next_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    async def request(self, message: wire.Request) -> wire.Reply:
        reply, fd = self._service.serve(self._session, message)
        if fd is not None:
            self._fds.append(os.dup(fd))  # the service keeps its own descriptor
        if isinstance(reply, wire.ErrorReply):
            raise HypervisorError(reply.code, reply.message)
        return reply

    def take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)
        self._service.leave(self._session)


class LoopbackTransport:
    """Channels to a service in this process."""

    def __init__(self, service: HypervisorService) -> None:
        self.service = service

    async def open_channel(self) -> LoopbackChannel:
        return LoopbackChannel(self.service)


async def loopback_domain(hv: Hypervisor, *, memory_mib: int = 64, vcpus: int = 2) -> Domain:
    """A booted domain of ``hv`` served in-process (the tests drop it with
    the hypervisor; nothing else holds resources)."""
    transport = LoopbackTransport(HypervisorService(hv))
    domain = await attach(transport, memory_mib=memory_mib, vcpus=vcpus, name="local")
    await boot_domain(domain)
    return domain
