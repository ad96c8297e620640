"""A guest's serial console as an asyncio byte pipe: libvirt's console stream (what `virsh
console` uses), non-blocking, its readable events delivered on the running loop through
libvirtaio (hvctl/virt.py registered it).

    c = await Console.open(virt, "vm1")
    async for chunk in c: ...          # bytes from the guest
    c.send(b"ls\\r")                     # to the guest
    c.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import libvirt

from hvctl.virt import NodeVirt, VirtError

RECV_CHUNK_BYTES = 4096
QUEUE_MAX = 256  # chunks; a reader that falls behind loses the oldest


class Console:
    def __init__(self, stream: libvirt.virStream) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_MAX)
        self.closed = False

    @classmethod
    async def open(cls, virt: NodeVirt, name: str) -> Console:
        conn = virt.conn()
        dom = virt.lookup(name)
        if dom is None or not dom.isActive():
            raise VirtError(f"node {virt.node}: {name} is not running there")
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            # FORCE: take the console over from another client (another page, virsh)
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        except libvirt.libvirtError as e:
            raise VirtError(f"node {virt.node}: cannot open {name}'s console: "
                            f"{e.get_error_message()}") from None
        c = cls(stream)
        stream.eventAddCallback(libvirt.VIR_STREAM_EVENT_READABLE |
                                libvirt.VIR_STREAM_EVENT_ERROR |
                                libvirt.VIR_STREAM_EVENT_HANGUP, c._event, None)
        return c

    def _event(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            while True:
                try:
                    data = stream.recv(RECV_CHUNK_BYTES)
                except libvirt.libvirtError:
                    data = b""
                if data == -2:  # would block: wait for the next event
                    return
                if not data:
                    break
                self._put(data)
        self._put(None)  # end of stream (hangup, error or EOF)
        self.close()

    def _put(self, item: bytes | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.stream.send(data)  # a few keystrokes: -2 (would block) drops them
        except libvirt.libvirtError:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.stream.eventRemoveCallback()
        except libvirt.libvirtError:
            pass
        try:
            self.stream.abort()
        except libvirt.libvirtError:
            pass
        self._put(None)
