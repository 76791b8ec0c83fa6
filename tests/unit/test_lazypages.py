"""Lazy pages without CRIU: the page-server codec, the server against a scripted daemon,
the lazy layout of synthetic images, the page sources and the daemon's verdict."""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fogmig.platform.base.errors import TransferError
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import (
    LazyLayoutError,
    LazyPagesFailed,
    PageNotFoundError,
    PageServerError,
)
from fogmig.platform.migration.lazy.hot import (
    HOT_INDEX,
    HOT_PAGES,
    hot_page_limit,
    read_hot,
    write_hot,
)
from fogmig.platform.migration.lazy.kept import SUFFIX as KEPT_SUFFIX
from fogmig.platform.migration.lazy.kept import decode_kept, encode_kept
from fogmig.platform.migration.lazy.layout import (
    convert_to_lazy_layout,
    convert_to_lazy_layout_sync,
)
from fogmig.platform.migration.lazy.protocol import (
    CLOSE_STATUS_OK,
    IOV_SIZE,
    CloseRequest,
    Command,
    GetPages,
    PageServerConnection,
    PageServerIov,
    ProtocolError,
    get_request,
    pages_reply_header,
)
from fogmig.platform.migration.lazy.server import (
    LazyPageServer,
)
from fogmig.platform.migration.lazy.sources import (
    LayeredPages,
    LocalImagePages,
    PageTally,
    RemotePages,
)
from fogmig.platform.migration.lazy.verdict import (
    AddressEvent,
    LazyPagesOutcome,
    TaskTransfer,
    parse_lazy_pages_events,
    parse_lazy_pages_log,
    released_and_missing,
)
from fogmig.platform.runtime.image import (
    IMG_COMMON_MAGIC,
    PAGEMAP_MAGIC,
    decode_message,
    encode_message,
    parse_image,
    write_image,
)

P = PAGE_SIZE


def page(tag: int) -> bytes:
    return bytes([tag % 256]) * P


# --------------------------------------------------------------------------- codec


def test_iov_layout_matches_the_c_struct() -> None:
    iov = PageServerIov(Command.GET, 3, 0x7F0000001000, 42)
    raw = iov.encode()
    assert len(raw) == IOV_SIZE == 32
    assert raw[:4] == struct.pack("<I", 7)
    assert raw[4:8] == b"\0\0\0\0"  # padding before the u64 fields
    assert struct.unpack("<QQQ", raw[8:]) == (3, 0x7F0000001000, 42)
    assert PageServerIov.decode(raw) == iov


def test_iov_decode_rejects_wrong_length() -> None:
    with pytest.raises(ProtocolError):
        PageServerIov.decode(b"\0" * 31)


def test_reply_header_echoes_the_request_with_add_f_present() -> None:
    req = PageServerIov.decode(get_request(7, 0x10000, 4))
    reply = PageServerIov.decode(pages_reply_header(req, 2))
    assert reply.command == Command.ADD_F
    assert reply.flags == 4  # PE_PRESENT
    assert reply.cmd == 6 | 4 << 16
    assert (reply.nr_pages, reply.vaddr, reply.dst_id) == (2, 0x10000, 7)
    for bad in (0, 5):
        with pytest.raises(ProtocolError):
            pages_reply_header(req, bad)


def test_close_status_is_int32_zero() -> None:
    assert CLOSE_STATUS_OK == b"\0\0\0\0"


def test_connection_assembles_headers_fed_byte_by_byte() -> None:
    conn = PageServerConnection()
    stream = get_request(1, 0x2000, 1) + get_request(1, 0x5000, 8)
    events = []
    for b in stream[:-1]:
        events += conn.receive(bytes([b]))
    assert len(events) == 1
    assert conn.pending_bytes == IOV_SIZE - 1
    events += conn.receive(stream[-1:])
    assert [(e.pid_id, e.vaddr, e.nr_pages) for e in events if isinstance(e, GetPages)] == [
        (1, 0x2000, 1),
        (1, 0x5000, 8),
    ]


@pytest.mark.parametrize("command", [Command.CLOSE, Command.FORCE_CLOSE])
def test_connection_close_ends_the_stream(command: Command) -> None:
    conn = PageServerConnection()
    events = conn.receive(PageServerIov(command, 0, 0, 0).encode())
    assert events == [CloseRequest(force=command == Command.FORCE_CLOSE)]
    assert conn.closed
    with pytest.raises(ProtocolError):
        conn.receive(b"x")


@pytest.mark.parametrize(
    "iov",
    [
        PageServerIov(Command.ADD_F, 1, 0x1000, 1),  # a dump pushing pages: not here
        PageServerIov(Command.OPEN2, 0, 0, 1),
        PageServerIov(0x77, 0, 0, 0),
        PageServerIov(Command.GET, 0, 0x1000, 1),  # zero pages
        PageServerIov(Command.GET, 1, 0x1001, 1),  # unaligned
    ],
)
def test_connection_rejects_what_a_lazy_daemon_never_sends(iov: PageServerIov) -> None:
    with pytest.raises(ProtocolError):
        PageServerConnection().receive(iov.encode())


# --------------------------------------------------------------------------- synthetic images


def pagemap_image(pages_id: int, entries: list[tuple[int, int, int]]) -> bytes:
    """A pagemap as CRIU writes it: head {pages_id}, entries {vaddr, 0, flags, nr_pages}."""
    records = [encode_message([(1, pages_id)])]
    records += [encode_message([(1, v), (2, 0), (4, f), (5, n)]) for v, n, f in entries]
    return write_image((IMG_COMMON_MAGIC, PAGEMAP_MAGIC), records)


def read_entries(path: Path) -> tuple[int, list[tuple[int, int, int]]]:
    img = parse_image(path.read_bytes())
    head = decode_message(img.records[0])
    entries = []
    for rec in img.records[1:]:
        f = decode_message(rec)
        entries.append((int(f[1][0]), int(f[5][0]), int(f[4][0])))  # type: ignore[arg-type]
    return int(head[1][0]), entries  # type: ignore[arg-type]


# Task 1: two lazy runs around a present-only page (vdso/stack-like); 0x12000 continues
# 0x10000 so reads may cross entries. Task 7: one lazy run. Shared memory: present only.
TASK1 = [(0x10000, 2, 6), (0x12000, 1, 6), (0x20000, 1, 4), (0x30000, 3, 6)]
TASK7 = [(0x40000, 2, 6)]


def task1_page(vaddr: int) -> bytes:
    return page(vaddr >> 12)


@pytest.fixture
def full_dump(tmp_path: Path) -> Path:
    d = tmp_path / "full"
    d.mkdir()
    (d / "pagemap-1.img").write_bytes(pagemap_image(11, TASK1))
    (d / "pages-11.img").write_bytes(
        b"".join(task1_page(v + i * P) for v, n, _ in TASK1 for i in range(n))
    )
    (d / "pagemap-7.img").write_bytes(pagemap_image(12, TASK7))
    (d / "pages-12.img").write_bytes(page(0xA1) + page(0xA2))
    (d / "pagemap-shmem-5.img").write_bytes(pagemap_image(13, [(0, 1, 6)]))
    (d / "pages-13.img").write_bytes(page(0x55))
    (d / "core-1.img").write_bytes(b"core")
    (d / "inventory.img").write_bytes(b"inventory")
    return d


async def test_conversion_drops_lazy_pages_and_keeps_the_rest(
    full_dump: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lazy"
    stats = await convert_to_lazy_layout(full_dump, out)

    pages_id, entries = read_entries(out / "pagemap-1.img")
    assert pages_id == 11
    assert entries == [(0x10000, 2, 2), (0x12000, 1, 2), (0x20000, 1, 4), (0x30000, 3, 2)]
    assert (out / "pages-11.img").read_bytes() == task1_page(0x20000)
    assert read_entries(out / "pagemap-7.img")[1] == [(0x40000, 2, 2)]
    assert (out / "pages-12.img").read_bytes() == b""
    # Shared memory is not restored through uffd: copied as it is.
    for name in ("pagemap-shmem-5.img", "pages-13.img", "core-1.img", "inventory.img"):
        assert (out / name).read_bytes() == (full_dump / name).read_bytes()
    assert stats.lazy_pages == 8
    assert stats.lazy_bytes == 8 * P
    assert stats.pages_kept == 2  # task 1's present-only page and the shmem page
    assert stats.lazy_pages_by_task == {1: 6, 7: 2}
    assert stats.tasks == 2
    assert stats.files_written == 8
    assert stats.bytes_written == sum(p.stat().st_size for p in out.iterdir())
    # The full dump stays as it was: it is the safe copy.
    assert read_entries(full_dump / "pagemap-1.img")[1] == TASK1


async def test_conversion_refuses_an_incremental_dump(full_dump: Path, tmp_path: Path) -> None:
    (full_dump / "parent").symlink_to(tmp_path)
    with pytest.raises(LazyLayoutError, match="parent"):
        await convert_to_lazy_layout(full_dump, tmp_path / "lazy")


async def test_conversion_refuses_pages_in_parent(full_dump: Path, tmp_path: Path) -> None:
    (full_dump / "pagemap-7.img").write_bytes(pagemap_image(12, [(0x40000, 2, 1)]))
    with pytest.raises(LazyLayoutError, match="parent image"):
        await convert_to_lazy_layout(full_dump, tmp_path / "lazy")


async def test_conversion_refuses_a_truncated_pages_file(full_dump: Path, tmp_path: Path) -> None:
    (full_dump / "pages-11.img").write_bytes(page(1))
    with pytest.raises(LazyLayoutError, match=r"pages-11\.img"):
        await convert_to_lazy_layout(full_dump, tmp_path / "lazy")


async def test_conversion_refuses_a_non_empty_target(full_dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "lazy"
    out.mkdir()
    (out / "stale.img").write_bytes(b"x")
    with pytest.raises(LazyLayoutError, match="not empty"):
        await convert_to_lazy_layout(full_dump, out)


async def test_conversion_refuses_a_directory_without_pagemaps(tmp_path: Path) -> None:
    with pytest.raises(LazyLayoutError, match="no pagemap"):
        await convert_to_lazy_layout(tmp_path, tmp_path / "lazy")


# --------------------------------------------------------------------------- page sources


async def test_local_pages_read_within_and_across_entries(full_dump: Path) -> None:
    with LocalImagePages(full_dump) as src:
        assert src.task_ids == [1, 7]
        assert await src.read(1, 0x11000, 1) == task1_page(0x11000)
        # 0x10000..0x13000 spans two adjacent entries; the hole after it ends the answer.
        got = await src.read(1, 0x10000, 8)
        assert got == b"".join(task1_page(0x10000 + i * P) for i in range(3))
        assert await src.read(1, 0x20000, 1) == task1_page(0x20000)
        assert await src.read(7, 0x41000, 4) == page(0xA2)
        for pid, vaddr in ((1, 0x13000), (1, 0x0), (2, 0x10000)):
            with pytest.raises(PageNotFoundError):
                await src.read(pid, vaddr, 1)
        assert src.tally.local_pages == 1 + 3 + 1 + 1
        assert src.tally.remote_pages == 0


async def test_local_pages_large_reads_leave_the_loop(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    n = 200  # 800 KiB: above the in-loop read limit
    (d / "pagemap-3.img").write_bytes(pagemap_image(1, [(0x100000, n, 6)]))
    data = b"".join(page(i) for i in range(n))
    (d / "pages-1.img").write_bytes(data)
    with LocalImagePages(d) as src:
        assert await src.read(3, 0x100000, n) == data


def test_local_pages_check_the_pages_file_size(full_dump: Path) -> None:
    (full_dump / "pages-12.img").write_bytes(page(1))
    with pytest.raises(LazyLayoutError, match=r"pages-12\.img"):
        LocalImagePages(full_dump)


async def test_remote_pages_count_and_validate() -> None:
    calls: list[tuple[int, int, int]] = []

    async def fetch(pid: int, vaddr: int, nr: int) -> bytes:
        calls.append((pid, vaddr, nr))
        if vaddr == 0x9000:
            return b""
        if vaddr == 0xA000:
            return b"short"
        return page(vaddr >> 12) * min(nr, 2)

    src = RemotePages(fetch)
    assert await src.read(1, 0x1000, 5) == page(1) * 2
    with pytest.raises(PageNotFoundError):
        await src.read(1, 0x9000, 1)
    with pytest.raises(PageServerError):
        await src.read(1, 0xA000, 1)
    assert calls == [(1, 0x1000, 5), (1, 0x9000, 1), (1, 0xA000, 1)]
    assert (src.tally.remote_pages, src.tally.remote_bytes, src.tally.remote_requests) == (
        2,
        2 * P,
        1,
    )


class DictPages:
    """A page source over a dict {(pid, vaddr): page}, with optional per-request delays."""

    def __init__(self, pages: dict[tuple[int, int], bytes], delays: dict[int, float] | None = None):
        self.pages = pages
        self.delays = delays or {}
        self.calls: list[tuple[int, int, int]] = []
        self.given_back: list[tuple[int, int, int]] = []
        self.noted = 0
        """Requests it was told of."""
        self._tally = PageTally()

    @property
    def tally(self) -> PageTally:
        return self._tally

    async def read(self, pid_id: int, vaddr: int, nr_pages: int, *, fault: bool = False) -> bytes:
        self.calls.append((pid_id, vaddr, nr_pages))
        await asyncio.sleep(self.delays.get(vaddr, 0))
        out = b""
        for i in range(nr_pages):
            p = self.pages.get((pid_id, vaddr + i * P))
            if p is None:
                break
            out += p
        if not out:
            raise PageNotFoundError(pid_id, vaddr)
        self._tally.add_local(len(out))
        return out

    def give_back(self, pid_id: int, vaddr: int, data: bytes) -> None:
        self.given_back.append((pid_id, vaddr, len(data) // P))

    def note_request(self) -> None:
        self.noted += 1


async def test_layered_pages_split_by_changed_vaddrs() -> None:
    base = {(1, 0x1000 + i * P): page(i) for i in range(6)}
    fresh = {(1, 0x1000 + i * P): page(100 + i) for i in range(6)}
    local, remote = DictPages(base), DictPages(fresh)
    changed = {1: {0x2000, 0x3000, 0x6000}}
    layered = LayeredPages(local, remote, changed)
    got = await layered.read(1, 0x1000, 6)
    assert got == page(0) + page(101) + page(102) + page(3) + page(4) + page(105)
    assert sorted(remote.calls) == [(1, 0x2000, 2), (1, 0x6000, 1)]
    assert sorted(local.calls) == [(1, 0x1000, 1), (1, 0x4000, 2)]
    assert (layered.tally.local_pages, layered.tally.remote_pages) == (3, 3)
    assert layered.remote_page_count == 3


async def test_layered_pages_answer_the_prefix_before_a_missing_page() -> None:
    local = DictPages({(1, 0x1000): page(1), (1, 0x3000): page(3)})
    remote = DictPages({})
    layered = LayeredPages(local, remote, {1: {0x2000}})
    assert await layered.read(1, 0x1000, 3) == page(1)
    with pytest.raises(PageNotFoundError):
        await layered.read(1, 0x2000, 1)


async def test_layered_pages_pass_a_remote_failure_on() -> None:
    async def fetch(pid: int, vaddr: int, nr: int) -> bytes:
        raise TransferError("link down")

    local = DictPages({(1, 0x1000): page(1), (1, 0x2000): page(2)})
    layered = LayeredPages(local, RemotePages(fetch), {1: {0x2000}})
    with pytest.raises(TransferError, match="link down"):
        await layered.read(1, 0x1000, 2)
    assert layered.tally.local_pages == 0


# --------------------------------------------------------------------------- the server


class FakeDaemon:
    """The page-server side of CRIU's lazy-pages daemon, scripted.

    It reads replies as the real one does (criu/page-xfer.c): each into its oldest
    outstanding read, so every reply must answer that very request, no longer than asked.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reads: list[tuple[int, int, int]] = []  # (pid, vaddr, nr_pages), oldest first

    async def ask(self, pid: int, vaddr: int, nr: int) -> None:
        self.reads.append((pid, vaddr, nr))
        self.writer.write(get_request(pid, vaddr, nr))
        await self.writer.drain()

    async def answer(self) -> tuple[PageServerIov, bytes]:
        header = PageServerIov.decode(await self.reader.readexactly(IOV_SIZE))
        if self.reads:
            pid, vaddr, nr = self.reads.pop(0)
            assert (header.dst_id, header.vaddr) == (pid, vaddr), "a reply out of order"
            assert header.nr_pages <= nr, "a reply longer than the read it lands in"
        return header, await self.reader.readexactly(header.nr_pages * P)

    async def close(self) -> bytes:
        self.writer.write(PageServerIov(Command.CLOSE, 0, 0, 0).encode())
        await self.writer.drain()
        status = await self.reader.readexactly(4)
        self.writer.close()
        await self.writer.wait_closed()
        return status

    async def hang_up(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
async def served(full_dump: Path) -> AsyncIterator[tuple[LazyPageServer, FakeDaemon]]:
    with LocalImagePages(full_dump) as source:
        async with LazyPageServer(source=source, clock=FakeClock()) as server:
            reader, writer = await asyncio.open_connection(sock=await server.channel())
            daemon = FakeDaemon(reader, writer)
            try:
                yield server, daemon
            finally:
                writer.close()
                await writer.wait_closed()


async def test_server_answers_get_and_close(
    served: tuple[LazyPageServer, FakeDaemon],
) -> None:
    server, daemon = served
    await daemon.ask(1, 0x31000, 1)
    header, data = await daemon.answer()
    assert (header.command, header.flags, header.nr_pages) == (Command.ADD_F, 4, 1)
    assert (header.vaddr, header.dst_id) == (0x31000, 1)
    assert data == task1_page(0x31000)
    # A range running past its entry gets the pages there are; the daemon asks again later.
    await daemon.ask(1, 0x31000, 5)
    header, data = await daemon.answer()
    assert header.nr_pages == 2
    assert data == task1_page(0x31000) + task1_page(0x32000)
    assert await daemon.close() == CLOSE_STATUS_OK
    stats = await server.wait_session(timeout=5)
    assert stats.closed_cleanly
    assert stats.error is None
    assert (stats.requests, stats.pages_served, stats.bytes_served) == (2, 3, 3 * P)
    assert (stats.local_pages, stats.remote_pages) == (3, 0)
    assert stats.faulted_pages_bytes == 3 * P
    # Fake clock: requests at 101 and 103, pages written at 102 and 104.
    assert (stats.first_request_at, stats.last_request_at, stats.last_page_at) == (
        101.0,
        103.0,
        104.0,
    )
    assert stats.faulted_pages_transfer_time == 3.0
    assert server.served_pages == {1: {0x31000, 0x32000}}


async def test_server_ends_the_session_on_an_unknown_page(
    served: tuple[LazyPageServer, FakeDaemon],
) -> None:
    server, daemon = served
    await daemon.ask(1, 0x10000, 1)
    await daemon.ask(1, 0x7000, 1)  # no such page
    await daemon.ask(1, 0x11000, 1)
    header, _ = await daemon.answer()
    assert header.vaddr == 0x10000
    # CRIU's own page server closes the connection here: the daemon then fails.
    assert await daemon.reader.read() == b""
    stats = await server.wait_session(timeout=5)
    assert not stats.closed_cleanly
    assert stats.error is not None
    assert "0x7000" in stats.error
    assert stats.pages_served == 1


async def test_server_treats_hang_up_without_close_as_failure(
    served: tuple[LazyPageServer, FakeDaemon],
) -> None:
    server, daemon = served
    await daemon.ask(7, 0x40000, 2)
    await daemon.answer()
    await daemon.hang_up()
    stats = await server.wait_session(timeout=5)
    assert not stats.closed_cleanly
    assert stats.error is not None
    assert "hung up" in stats.error


async def test_server_refuses_a_second_session(
    served: tuple[LazyPageServer, FakeDaemon],
) -> None:
    server, daemon = served
    await daemon.ask(7, 0x40000, 1)
    await daemon.answer()
    reader, writer = await asyncio.open_connection(sock=await server.channel())
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    # The first session is unaffected.
    await daemon.ask(7, 0x41000, 1)
    assert (await daemon.answer())[1] == page(0xA2)
    assert await daemon.close() == CLOSE_STATUS_OK
    assert server.stats.connections == 1


async def test_server_keeps_request_order_when_answers_finish_out_of_order() -> None:
    pages = {(1, 0x1000 * i): page(i) for i in range(1, 6)}
    # The first request is the slowest to answer; replies must still come in request order.
    source = DictPages(pages, delays={0x1000: 0.05, 0x2000: 0.02})
    async with LazyPageServer(source=source, max_in_flight=4) as server:
        reader, writer = await asyncio.open_connection(sock=await server.channel())
        daemon = FakeDaemon(reader, writer)
        for i in range(1, 6):
            await daemon.ask(1, 0x1000 * i, 1)
        got = [await daemon.answer() for _ in range(5)]
        assert [h.vaddr for h, _ in got] == [0x1000 * i for i in range(1, 6)]
        assert [d for _, d in got] == [page(i) for i in range(1, 6)]
        assert await daemon.close() == CLOSE_STATUS_OK
        stats = await server.wait_session(timeout=5)
    assert stats.requests == 5
    assert stats.closed_cleanly


async def test_server_answers_background_ranges_in_part_and_faults_whole() -> None:
    pages = {(1, 0x1000 * i): page(i % 250) for i in range(1, 21)}
    async with LazyPageServer(source=DictPages(pages), max_reply_pages=4) as server:
        reader, writer = await asyncio.open_connection(sock=await server.channel())
        daemon = FakeDaemon(reader, writer)
        await daemon.ask(1, 0x1000, 16)  # the daemon's background range
        await daemon.ask(1, 0x11000, 1)  # a fault queued behind it
        (bg, bg_data), (fault, _) = await daemon.answer(), await daemon.answer()
        assert (bg.vaddr, bg.nr_pages) == (0x1000, 4)  # the rest is asked for again
        assert bg_data == b"".join(page(i % 250) for i in range(1, 5))
        assert (fault.vaddr, fault.nr_pages) == (0x11000, 1)
        assert await daemon.close() == CLOSE_STATUS_OK
        await server.wait_session(timeout=5)


async def test_server_reports_a_failing_remote_source() -> None:
    async def fetch(pid: int, vaddr: int, nr: int) -> bytes:
        raise TransferError("source node unreachable")

    async with LazyPageServer(source=RemotePages(fetch)) as server:
        reader, writer = await asyncio.open_connection(sock=await server.channel())
        daemon = FakeDaemon(reader, writer)
        await daemon.ask(1, 0x1000, 1)
        assert await reader.read() == b""
        stats = await server.wait_session(timeout=5)
        writer.close()
        await writer.wait_closed()
    assert stats.error is not None
    assert "unreachable" in stats.error
    assert stats.pages_served == 0


async def test_server_over_a_channel_without_listening(full_dump: Path) -> None:
    with LocalImagePages(full_dump) as source:
        async with LazyPageServer(source=source) as server:
            sock = await server.channel()
            reader, writer = await asyncio.open_connection(sock=sock)
            daemon = FakeDaemon(reader, writer)
            await daemon.ask(7, 0x40000, 2)
            header, data = await daemon.answer()
            assert (header.nr_pages, data) == (2, page(0xA1) + page(0xA2))
            assert await daemon.close() == CLOSE_STATUS_OK
            stats = await server.wait_session(timeout=5)
    assert stats.closed_cleanly
    assert stats.pages_served == 2


# --------------------------------------------------------------------------- verdict

LOG = """\
(00.101) uffd: 93-5: Found 2950 pages to be handled by UFFD
(00.200) uffd: 93-5: REMAP: 7f0000010000 -> 7f0000100000 (8192)
(00.210) uffd: 93-5: UNMAP: 7f0000100000(1000)
(00.220) uffd: 93-5: REMOVE: 7f0000020000(2000)
(00.300) uffd: 93-5: UFFD transferred pages: (2950/2950)
(00.301) uffd: 94-6: UFFD transferred pages: (12/12)
"""


def test_parse_lazy_pages_log() -> None:
    assert parse_lazy_pages_log(LOG) == [(2950, 2950), (12, 12)]
    assert parse_lazy_pages_log("Error (criu/uffd.c): nothing\n") == []


def test_parse_lazy_pages_events_in_log_order() -> None:
    parsed = parse_lazy_pages_events(LOG)
    assert parsed.tasks == [TaskTransfer(93, 2950, 2950), TaskTransfer(94, 12, 12)]
    assert parsed.events == [
        AddressEvent(93, "remap", 0x7F0000010000, 8192, 0x7F0000100000),
        AddressEvent(93, "unmap", 0x7F0000100000, 0x1000),
        AddressEvent(93, "remove", 0x7F0000020000, 0x2000),
    ]


def test_released_pages_follow_remaps() -> None:
    base = 0x7F0000010000
    lazy = [base + i * P for i in range(4)] + [0x7F0000020000, 0x7F0000021000, 0x7F0000030000]
    events = parse_lazy_pages_events(LOG).events
    # Pages 0-1 moved to 0x...100000 and page 0 of them was unmapped there; 0x20000 and
    # 0x21000 were removed in place. Nothing served: the remaining four are missing.
    assert released_and_missing(lazy, [], events) == (3, 4)
    served = [base + P, base + 2 * P, base + 3 * P, 0x7F0000030000]
    assert released_and_missing(lazy, served, events) == (3, 0)
    # Without the remap the unmap misses the original addresses.
    assert released_and_missing(lazy, served, events[1:]) == (2, 1)


def outcome(
    tmp_path: Path,
    returncode: int | None,
    transfers: list[tuple[int, int]],
    *,
    expected_tasks: int | None = None,
    released: dict[int, int] | None = None,
    missing: dict[int, int] | None = None,
) -> LazyPagesOutcome:
    return LazyPagesOutcome(
        returncode=returncode,
        tasks=[TaskTransfer(pid, c, t) for pid, (c, t) in enumerate(transfers, start=1)],
        log_path=tmp_path / "lazy-pages.log",
        expected_tasks=expected_tasks,
        argv=["criu"],
        released=released or {},
        missing=missing,
    )


@pytest.mark.parametrize(
    ("returncode", "transfers", "expected_tasks", "ok"),
    [
        (0, [(10, 10), (3, 3)], 2, True),
        (0, [(10, 10)], None, True),
        (1, [(10, 10)], None, False),  # the exit code alone fails it
        (0, [(9, 10)], None, False),  # a task short of pages
        (0, [], None, False),  # nothing reported is not success
        (0, [(10, 10)], 2, False),  # a task never reported
        (None, [(10, 10)], None, False),  # killed
    ],
)
def test_outcome_verdict(
    tmp_path: Path,
    returncode: int | None,
    transfers: list[tuple[int, int]],
    expected_tasks: int | None,
    ok: bool,
) -> None:
    result = outcome(tmp_path, returncode, transfers, expected_tasks=expected_tasks)
    assert result.ok is ok
    if ok:
        result.raise_for_failure()
    else:
        with pytest.raises(LazyPagesFailed) as failure:
            result.raise_for_failure()
        assert failure.value.log_path == result.log_path
        assert str(result.log_path) in str(failure.value)


@pytest.mark.parametrize(
    ("released", "missing", "ok"),
    [
        ({1: 4}, {1: 0}, True),  # the task freed what it never got: healthy
        ({1: 4}, None, False),  # no record of served pages: only N/N passes
        ({1: 4}, {1: 1}, False),  # one page neither served nor released: a hole
        ({1: 2}, {1: 0}, False),  # the counts do not add up
    ],
)
def test_outcome_accepts_only_pages_the_task_released(
    tmp_path: Path, released: dict[int, int], missing: dict[int, int] | None, ok: bool
) -> None:
    result = outcome(tmp_path, 0, [(6, 10)], expected_tasks=1, released=released, missing=missing)
    assert result.ok is ok
    assert "6/10" in result.describe()


# --------------------------------------------------------------------------- kept pages delta


def test_kept_pages_travel_as_a_delta_and_rebuild_byte_identical(
    full_dump: Path, tmp_path: Path
) -> None:
    lazy = tmp_path / "lazy"
    convert_to_lazy_layout_sync(full_dump, lazy)
    kept = lazy / "pages-11.img"
    # The frozen service changed two bytes of its kept page since the base round.
    changed = bytearray(kept.read_bytes())
    changed[10] ^= 0xFF
    changed[4000] ^= 0x01
    kept.write_bytes(bytes(changed))
    originals = {p.name: p.read_bytes() for p in lazy.glob("pages-*.img")}
    stats = encode_kept(lazy, full_dump)
    assert not [p for p in lazy.glob("pages-*.img") if p.stat().st_size]  # only empty ones
    assert stats.xor_pages == stats.pages
    assert stats.coded_bytes < stats.plain_bytes // 4
    assert decode_kept(lazy, full_dump) == stats.files
    assert {p.name: p.read_bytes() for p in lazy.glob("pages-*.img")} == originals
    assert not list(lazy.glob(f"*{KEPT_SUFFIX}"))


def test_a_kept_pages_delta_on_another_base_or_damaged_is_refused(
    full_dump: Path, tmp_path: Path
) -> None:
    lazy = tmp_path / "lazy"
    convert_to_lazy_layout_sync(full_dump, lazy)
    encode_kept(lazy, full_dump)
    other = tmp_path / "other"
    other.mkdir()
    (other / "pagemap-1.img").write_bytes(pagemap_image(11, [(0x90000, 1, 4)]))
    (other / "pages-11.img").write_bytes(page(9))
    spare = tmp_path / "spare"
    shutil.copytree(lazy, spare)
    with pytest.raises(LazyLayoutError, match="does not have"):
        decode_kept(lazy, other)
    coded = next(spare.glob(f"*{KEPT_SUFFIX}"))
    coded.write_bytes(coded.read_bytes()[:-3])
    with pytest.raises(LazyLayoutError, match=coded.name):
        decode_kept(spare, full_dump)


# --------------------------------------------------------------------------- working set


def test_working_set_goes_with_the_layout_and_only_lazy_pages(
    full_dump: Path, tmp_path: Path
) -> None:
    lazy = tmp_path / "lazy"
    convert_to_lazy_layout_sync(full_dump, lazy)
    hot = {
        1: [0x10000, 0x20000, 0x31000, 0x99000, 0x10000],  # 0x20000 is not lazy; 0x99000 absent
        7: [0x40000],
        9: [0x50000],  # no such task
    }
    assert write_hot(lazy, full_dump, hot) == 3
    got = read_hot(lazy)
    assert got == {
        (1, 0x10000): task1_page(0x10000),
        (1, 0x31000): task1_page(0x31000),
        (7, 0x40000): page(0xA1),
    }
    # Hybrid: only the changed pages among them.
    assert write_hot(lazy, full_dump, hot, among={1: [0x31000]}) == 1
    assert list(read_hot(lazy)) == [(1, 0x31000)]


def test_no_working_set_leaves_no_file(full_dump: Path, tmp_path: Path) -> None:
    lazy = tmp_path / "lazy"
    convert_to_lazy_layout_sync(full_dump, lazy)
    assert write_hot(lazy, full_dump, {1: [0x20000]}) == 0
    assert not (lazy / HOT_PAGES).exists()
    assert not (lazy / HOT_INDEX).exists()
    assert read_hot(lazy) == {}


def test_a_damaged_working_set_is_refused(full_dump: Path, tmp_path: Path) -> None:
    lazy = tmp_path / "lazy"
    convert_to_lazy_layout_sync(full_dump, lazy)
    assert write_hot(lazy, full_dump, {1: [0x10000, 0x11000]}) == 2
    pages_file = lazy / HOT_PAGES
    pages_file.write_bytes(pages_file.read_bytes()[:-1])
    with pytest.raises(LazyLayoutError, match="bytes for the 2 pages"):
        read_hot(lazy)
    (lazy / HOT_INDEX).write_text('{"pages": {"1": [4097]}}')
    pages_file.write_bytes(page(1))
    with pytest.raises(LazyLayoutError, match="not a page address"):
        read_hot(lazy)
    (lazy / HOT_INDEX).write_text('{"1": [4096]}')  # no "pages"
    with pytest.raises(LazyLayoutError, match="cannot be read"):
        read_hot(lazy)


def test_hot_page_limit_follows_the_link() -> None:
    assert hot_page_limit(None) == 512
    slow, fast = hot_page_limit(11.34e6 / 8), hot_page_limit(72.41e6 / 8)
    assert 256 <= slow < fast == 1024
    assert hot_page_limit(1000.0) == 64


async def test_layered_pages_give_back_remote_runs_past_the_prefix() -> None:
    local = DictPages({})  # the base lacks 0x2000: the prefix ends there
    remote = DictPages({(1, 0x1000): page(1), (1, 0x3000): page(3)})
    layered = LayeredPages(local, remote, {1: [0x1000, 0x3000]})
    assert await layered.read(1, 0x1000, 3) == page(1)
    # 0x3000 was fetched alongside and is not lost: the remote side keeps it.
    assert remote.given_back == [(1, 0x3000, 1)]


def test_hybrid_working_set_travels_as_xor_against_the_base(
    full_dump: Path, tmp_path: Path
) -> None:
    final = tmp_path / "final"
    shutil.copytree(full_dump, final)
    pages_file = final / "pages-11.img"
    data = bytearray(pages_file.read_bytes())
    data[5] ^= 0xFF  # the service wrote a byte of its first page (0x10000) since the round
    pages_file.write_bytes(bytes(data))
    lazy = tmp_path / "lazy"
    convert_to_lazy_layout_sync(final, lazy)
    assert write_hot(lazy, final, {1: [0x10000], 7: [0x40000]}, base_dir=full_dump) == 2
    # What travels is the XOR: all zeros but the byte written.
    shipped = (lazy / HOT_PAGES).read_bytes()
    assert shipped[:P].count(0) == P - 1
    with LocalImagePages(full_dump) as base:
        got = read_hot(lazy, base=base)
    assert got[(1, 0x10000)] == bytes(data[:P])
    assert got[(7, 0x40000)] == page(0xA1)
    with pytest.raises(LazyLayoutError, match="base page this node does not hold"):
        read_hot(lazy)
