"""The wire format of CRIU's page-server protocol as the lazy-pages daemon speaks it.

Pure codec and connection logic, no I/O: bytes in, events and bytes out. The asyncio server in
``fogmig.platform.migration.lazy.server`` does the reading and writing around it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from fogmig.platform.base.vocabulary import PAGE_SIZE

# Pagemap entry flags (criu/include/pagemap.h).
PE_PARENT = 1
PE_LAZY = 2
PE_PRESENT = 4

# ``struct page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id;}`` with the C
# padding after ``cmd``: 32 bytes, host (little-endian) byte order.
IOV_STRUCT = struct.Struct("<I4xQQQ")
IOV_SIZE = IOV_STRUCT.size

# The command word carries the command in its low 16 bits and flags in the high 16 bits.
CMD_BITS = 16
CMD_MASK = (1 << CMD_BITS) - 1

# The answer to a close: one int32, 0 = everything was received.
CLOSE_STATUS_OK = struct.pack("<i", 0)


class Command(IntEnum):
    """Page-server commands (criu/page-xfer.c)."""

    ADD = 1
    HOLE = 2
    OPEN = 3
    OPEN2 = 4
    PARENT = 5
    ADD_F = 6
    GET = 7
    CLOSE = 0x1023
    FORCE_CLOSE = 0x1024


class ProtocolError(ValueError):
    """The peer sent something the lazy page server does not accept."""


@dataclass(frozen=True, slots=True)
class PageServerIov:
    """One ``page_server_iov`` header."""

    cmd: int
    nr_pages: int
    vaddr: int
    dst_id: int

    @property
    def command(self) -> int:
        return self.cmd & CMD_MASK

    @property
    def flags(self) -> int:
        return self.cmd >> CMD_BITS

    def encode(self) -> bytes:
        return IOV_STRUCT.pack(self.cmd, self.nr_pages, self.vaddr, self.dst_id)

    @classmethod
    def decode(cls, data: bytes) -> PageServerIov:
        if len(data) != IOV_SIZE:
            raise ProtocolError(f"page_server_iov is {IOV_SIZE} bytes, got {len(data)}")
        cmd, nr_pages, vaddr, dst_id = IOV_STRUCT.unpack(data)
        return cls(cmd, nr_pages, vaddr, dst_id)


def encode_command(command: int, flags: int = 0) -> int:
    return (flags << CMD_BITS) | command


def get_request(pid_id: int, vaddr: int, nr_pages: int) -> bytes:
    """What the lazy-pages daemon sends to ask for pages (used by tests and probes)."""
    return PageServerIov(Command.GET, nr_pages, vaddr, pid_id).encode()


def pages_reply_header(request: PageServerIov, nr_pages: int) -> bytes:
    """Header of a reply carrying ``nr_pages`` pages for ``request``.

    The daemon matches the reply to its request by ``dst_id`` and ``vaddr``, so both are echoed;
    ``nr_pages`` may be fewer than asked (the daemon asks again for the rest later).
    """
    if not 0 < nr_pages <= request.nr_pages:
        raise ProtocolError(f"reply of {nr_pages} pages to a request of {request.nr_pages}")
    return PageServerIov(
        encode_command(Command.ADD_F, PE_PRESENT), nr_pages, request.vaddr, request.dst_id
    ).encode()


@dataclass(frozen=True, slots=True)
class GetPages:
    """The daemon asks for ``nr_pages`` pages at ``vaddr`` of the task whose pagemap id is
    ``pid_id`` (the ``<id>`` of ``pagemap-<id>.img``)."""

    request: PageServerIov

    @property
    def pid_id(self) -> int:
        return self.request.dst_id

    @property
    def vaddr(self) -> int:
        return self.request.vaddr

    @property
    def nr_pages(self) -> int:
        return self.request.nr_pages


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """The daemon is done; it waits for :data:`CLOSE_STATUS_OK`."""

    force: bool


Event = GetPages | CloseRequest


class PageServerConnection:
    """Turns the bytes a lazy-pages daemon sends into events, sans I/O.

    Only what a lazy-pages daemon sends is accepted (GET and CLOSE); the commands a dumping
    CRIU uses to push pages (OPEN, ADD, ...) are a protocol error here, so a misdirected dump
    cannot write into the server.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.closed = False

    def receive(self, data: bytes) -> list[Event]:
        """Feed received bytes; return the complete events they finish, in order."""
        if self.closed and data:
            raise ProtocolError("data after the close request")
        self._buffer += data
        events: list[Event] = []
        while len(self._buffer) >= IOV_SIZE and not self.closed:
            iov = PageServerIov.decode(bytes(self._buffer[:IOV_SIZE]))
            del self._buffer[:IOV_SIZE]
            events.append(self._event(iov))
        if self.closed and self._buffer:
            raise ProtocolError("data after the close request")
        return events

    def _event(self, iov: PageServerIov) -> Event:
        command = iov.command
        if command == Command.GET:
            if iov.nr_pages == 0:
                raise ProtocolError(f"request for 0 pages at {iov.vaddr:#x}")
            if iov.vaddr % PAGE_SIZE:
                raise ProtocolError(f"request at unaligned address {iov.vaddr:#x}")
            return GetPages(iov)
        if command in (Command.CLOSE, Command.FORCE_CLOSE):
            self.closed = True
            return CloseRequest(force=command == Command.FORCE_CLOSE)
        raise ProtocolError(f"unsupported page-server command {iov.cmd:#x}")

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete header still buffered (non-zero at EOF = truncated)."""
        return len(self._buffer)
