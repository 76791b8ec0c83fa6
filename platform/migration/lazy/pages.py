"""Post-copy and hybrid lazy pages served by fogmig itself, not by CRIU's source page server.

The destination restores from a lazy layout of the source's complete local dump; CRIU's
lazy-pages daemon faults the rest in from :class:`LazyPageServer`, whose :class:`PageSource` is
the image on disk, the remote source, or both (hybrid). Judged at the destination only.

Log levels: DEBUG for every request, INFO for sessions, conversions and daemon outcomes,
WARNING for a rejected connection or a failed session.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np

from fogmig.platform.base.errors import CriuError, FogmigError, TransferError
from fogmig.platform.base.proc import NETNS_DIR, in_netns
from fogmig.platform.migration.lazy.protocol import (
    CLOSE_STATUS_OK,
    PAGE_SIZE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    CloseRequest,
    GetPages,
    PageServerConnection,
    ProtocolError,
    pages_reply_header,
)
from fogmig.platform.runtime.image import ImageFormatError
from fogmig.platform.runtime.pagemap import (
    Pagemap,
    PagemapEntry,
    is_pages_file,
    read_pagemaps,
    write_pagemap,
)

log = logging.getLogger(__name__)

LAZY_SOCKET_NAME = "lazy-pages.socket"
# Reads above this size leave the event loop so a fault's single page is never stuck behind
# a 4 MiB background chunk coming off the disk.
_THREAD_READ_BYTES = 256 * 1024


class LazyPagesError(FogmigError):
    """Lazy pages could not be prepared, served or delivered."""


class LazyLayoutError(LazyPagesError):
    """A dump cannot be turned into a lazy layout (incremental, truncated, unexpected files)."""


class PageServerError(TransferError):
    """The page server could not answer a request of the lazy-pages daemon."""


class PageNotFoundError(PageServerError):
    """No page source holds a page at the requested address of that task."""

    def __init__(self, pid_id: int, vaddr: int) -> None:
        self.pid_id = pid_id
        self.vaddr = vaddr
        super().__init__(f"no page of task {pid_id} at {vaddr:#x}")


class LazyPagesFailed(CriuError):
    """The lazy-pages daemon failed or did not deliver every page of every task."""


# --------------------------------------------------------------------------- lazy layout


@dataclass(frozen=True, slots=True)
class LazyLayoutStats:
    """What :func:`convert_to_lazy_layout` wrote."""

    files_written: int
    bytes_written: int
    pages_kept: int
    lazy_pages: int
    lazy_pages_by_task: dict[int, int]

    @property
    def lazy_bytes(self) -> int:
        return self.lazy_pages * PAGE_SIZE

    @property
    def tasks(self) -> int:
        """Tasks (process pagemaps) in the image; the daemon reports one line per task."""
        return len(self.lazy_pages_by_task)


def _task_id(pagemap: Pagemap) -> int | None:
    """The pid of a process pagemap; None for shared memory (``shmem-<id>``)."""
    return int(pagemap.image_id) if pagemap.image_id.isdigit() else None


def lazy_vaddrs(image_dir: Path) -> dict[int, list[int]]:
    """Per task, the address of every page the daemon must fault in (entries flagged LAZY)."""
    out: dict[int, list[int]] = {}
    for pagemap in read_pagemaps(image_dir).values():
        task = _task_id(pagemap)
        if task is not None:
            out[task] = [int(v) for v in pagemap.vaddrs_with(PE_LAZY).tolist()]
    return out


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    while length > 0:
        n = os.copy_file_range(src, dst, length, offset)
        if n <= 0:
            raise LazyLayoutError(f"short copy at offset {offset}: {length} bytes left")
        offset += n
        length -= n


def _convert_pagemap(full_dir: Path, out_dir: Path, pagemap: Pagemap) -> tuple[int, int]:
    """Write the lazy form of one process pagemap and its pages file; (kept, lazy) pages."""
    pages_name = pagemap.pages_file_name
    if pages_name is None:
        write_pagemap(out_dir, pagemap)
        return 0, 0
    src_path = full_dir / pages_name
    expected = pagemap.present_pages * PAGE_SIZE
    try:
        size = src_path.stat().st_size
    except FileNotFoundError as exc:
        raise LazyLayoutError(f"{src_path} is missing ({pagemap.file_name} names it)") from exc
    if size != expected:
        raise LazyLayoutError(
            f"{src_path} holds {size} bytes but {pagemap.file_name} lists "
            f"{pagemap.present_pages} present pages"
        )
    entries: list[PagemapEntry] = []
    kept = lazy = 0
    offset = 0
    src = os.open(src_path, os.O_RDONLY)
    try:
        dst = os.open(out_dir / pages_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for e in pagemap.entries:
                length = e.nr_pages * PAGE_SIZE if e.present else 0
                if e.lazy and e.present:
                    # What a lazy dump writes (criu/page-xfer.c ppb_xfer_flags): LAZY without
                    # PRESENT, and no bytes in the pages file.
                    entries.append(PagemapEntry(e.vaddr, e.nr_pages, e.flags & ~PE_PRESENT))
                    lazy += e.nr_pages
                else:
                    entries.append(e)
                    if length:
                        _copy_range(src, dst, offset, length)
                        kept += e.nr_pages
                offset += length
        finally:
            os.close(dst)
    finally:
        os.close(src)
    write_pagemap(out_dir, Pagemap(pagemap.image_id, pagemap.pages_id, tuple(entries)))
    return kept, lazy


def convert_to_lazy_layout_sync(full_dir: Path, out_dir: Path) -> LazyLayoutStats:
    """Blocking form of :func:`convert_to_lazy_layout`."""
    if (full_dir / "parent").exists() or (full_dir / "parent").is_symlink():
        raise LazyLayoutError(
            f"{full_dir} is an incremental dump (it has a parent link)",
            hint="serve lazy pages from a complete dump",
        )
    try:
        pagemaps = read_pagemaps(full_dir)
    except ImageFormatError as exc:
        raise LazyLayoutError(f"{full_dir}: {exc}") from exc
    if not pagemaps:
        raise LazyLayoutError(f"{full_dir} holds no pagemap: not a CRIU dump")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise LazyLayoutError(f"{out_dir} is not empty")

    converted_pages: set[str] = set()
    by_task: dict[int, int] = {}
    kept_total = lazy_total = 0
    for pagemap in pagemaps.values():
        task = _task_id(pagemap)
        if task is None:
            continue  # shared memory is restored from the image, never through uffd
        for e in pagemap.entries:
            if e.flags & PE_PARENT:
                raise LazyLayoutError(
                    f"{full_dir / pagemap.file_name} has pages in a parent image at {e.vaddr:#x}"
                )
        kept, lazy = _convert_pagemap(full_dir, out_dir, pagemap)
        by_task[task] = lazy
        kept_total += kept
        lazy_total += lazy
        converted_pages.add(pagemap.file_name)
        if pagemap.pages_file_name is not None:
            converted_pages.add(pagemap.pages_file_name)

    for path in sorted(full_dir.iterdir()):
        if path.name in converted_pages:
            continue
        if path.is_symlink() or not path.is_file():
            raise LazyLayoutError(f"{path}: unexpected non-file entry in a CRIU image directory")
        shutil.copy2(path, out_dir / path.name)
        if is_pages_file(path.name):
            kept_total += path.stat().st_size // PAGE_SIZE

    written = [p for p in out_dir.iterdir() if p.is_file()]
    stats = LazyLayoutStats(
        files_written=len(written),
        bytes_written=sum(p.stat().st_size for p in written),
        pages_kept=kept_total,
        lazy_pages=lazy_total,
        lazy_pages_by_task=by_task,
    )
    log.info(
        "lazy layout of %s: %d files, %d bytes, %d pages kept, %d lazy",
        full_dir,
        stats.files_written,
        stats.bytes_written,
        stats.pages_kept,
        stats.lazy_pages,
    )
    return stats


async def convert_to_lazy_layout(full_dir: Path, out_dir: Path) -> LazyLayoutStats:
    """Write into ``out_dir`` the image set of a lazy dump equivalent to the full dump.

    Every process pagemap entry flagged LAZY|PRESENT becomes LAZY and its pages leave the
    pages file; PRESENT-only entries (file-backed COW, stack, vDSO) keep theirs; every other
    file is copied. ``full_dir`` is left untouched: it stays the source's safe copy.
    """
    return await asyncio.to_thread(convert_to_lazy_layout_sync, full_dir, out_dir)


# --------------------------------------------------------------------------- page sources


@dataclass(slots=True)
class PageTally:
    """Pages a source handed out, by where they came from."""

    local_pages: int = 0
    local_bytes: int = 0
    remote_pages: int = 0
    remote_bytes: int = 0
    remote_requests: int = 0

    def add_local(self, nbytes: int) -> None:
        self.local_pages += nbytes // PAGE_SIZE
        self.local_bytes += nbytes

    def add_remote(self, nbytes: int) -> None:
        self.remote_pages += nbytes // PAGE_SIZE
        self.remote_bytes += nbytes
        self.remote_requests += 1


class PageSource(Protocol):
    """Where the page server gets the bytes of pages.

    ``read`` returns the pages starting at ``vaddr`` of task ``pid_id``: at least one and at
    most ``nr_pages`` (a shorter, contiguous prefix is fine, the daemon asks again for the
    rest), or raises :class:`PageNotFoundError` if it has no page at ``vaddr``.
    """

    @property
    def tally(self) -> PageTally: ...

    async def read(self, pid_id: int, vaddr: int, nr_pages: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _Run:
    vaddr: int
    nr_pages: int
    offset: int  # in the pages file


class _TaskPages:
    """The present pages of one task: sorted runs and the open pages file."""

    def __init__(self, path: Path, entries: list[PagemapEntry]) -> None:
        self.path = path
        runs: list[_Run] = []
        offset = 0
        for e in entries:
            if not e.present:
                continue
            runs.append(_Run(e.vaddr, e.nr_pages, offset))
            offset += e.nr_pages * PAGE_SIZE
        runs.sort(key=lambda r: r.vaddr)
        self.runs = runs
        self.starts = [r.vaddr for r in runs]
        self.size = offset
        self.fd: int | None = None

    def pieces(self, vaddr: int, nr_pages: int) -> list[tuple[int, int]]:
        """(file offset, length) pieces of the contiguous present pages from ``vaddr``."""
        i = bisect.bisect_right(self.starts, vaddr) - 1
        pieces: list[tuple[int, int]] = []
        want = nr_pages
        addr = vaddr
        while want > 0 and 0 <= i < len(self.runs):
            run = self.runs[i]
            end = run.vaddr + run.nr_pages * PAGE_SIZE
            if not run.vaddr <= addr < end:
                break
            n = min(want, (end - addr) // PAGE_SIZE)
            offset = run.offset + (addr - run.vaddr)
            length = n * PAGE_SIZE
            if pieces and pieces[-1][0] + pieces[-1][1] == offset:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + length)
            else:
                pieces.append((offset, length))
            want -= n
            addr += length
            i += 1
        return pieces


class LocalImagePages:
    """Pages read from a complete image set on this node's disk.

    The source serves the destination's remote requests from it, and the destination serves
    post-copy from it when the complete image was shipped ahead, or the unchanged pages of a
    hybrid migration from the pre-copy base.
    """

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = image_dir
        self._tally = PageTally()
        try:
            pagemaps = read_pagemaps(image_dir)
        except ImageFormatError as exc:
            raise LazyLayoutError(f"{image_dir}: {exc}") from exc
        self._tasks: dict[int, _TaskPages] = {}
        for pagemap in pagemaps.values():
            task = _task_id(pagemap)
            if task is None or pagemap.pages_file_name is None:
                continue
            pages = _TaskPages(image_dir / pagemap.pages_file_name, list(pagemap.entries))
            try:
                size = pages.path.stat().st_size
            except FileNotFoundError as exc:
                raise LazyLayoutError(f"{pages.path} is missing") from exc
            if size != pages.size:
                raise LazyLayoutError(
                    f"{pages.path} holds {size} bytes, {pagemap.file_name} lists {pages.size}"
                )
            self._tasks[task] = pages

    @property
    def tally(self) -> PageTally:
        return self._tally

    @property
    def task_ids(self) -> list[int]:
        return sorted(self._tasks)

    def _read_sync(self, pages: _TaskPages, pieces: list[tuple[int, int]]) -> bytes:
        if pages.fd is None:
            pages.fd = os.open(pages.path, os.O_RDONLY | os.O_CLOEXEC)
        chunks: list[bytes] = []
        for offset, length in pieces:
            chunk = os.pread(pages.fd, length, offset)
            if len(chunk) != length:
                raise PageServerError(f"{pages.path}: short read at offset {offset}")
            chunks.append(chunk)
        # Most answers are one piece: hand that buffer on without another copy.
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read(self, pid_id: int, vaddr: int, nr_pages: int) -> bytes:
        pages = self._tasks.get(pid_id)
        if pages is None:
            raise PageNotFoundError(pid_id, vaddr)
        pieces = pages.pieces(vaddr, nr_pages)
        if not pieces:
            raise PageNotFoundError(pid_id, vaddr)
        total = sum(length for _, length in pieces)
        if total > _THREAD_READ_BYTES:
            data = await asyncio.to_thread(self._read_sync, pages, pieces)
        else:
            data = self._read_sync(pages, pieces)
        self._tally.add_local(len(data))
        return data

    def close(self) -> None:
        for pages in self._tasks.values():
            if pages.fd is not None:
                os.close(pages.fd)
                pages.fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Fetch = Callable[[int, int, int], Awaitable[bytes]]


class RemotePages:
    """Pages fetched from the source node through ``fetch(pid_id, vaddr, nr_pages)``.

    The migration engine plugs the agents' authenticated transfer channel in here, so every
    request costs a real round trip over the data link. ``fetch`` returns the pages (a prefix
    is allowed), empty bytes when the source has none there, or raises (a lost source).
    """

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._tally = PageTally()

    @property
    def tally(self) -> PageTally:
        return self._tally

    async def read(self, pid_id: int, vaddr: int, nr_pages: int) -> bytes:
        data = await self._fetch(pid_id, vaddr, nr_pages)
        if not data:
            raise PageNotFoundError(pid_id, vaddr)
        if len(data) % PAGE_SIZE or len(data) > nr_pages * PAGE_SIZE:
            raise PageServerError(
                f"source answered {len(data)} bytes for {nr_pages} pages at {vaddr:#x} "
                f"of task {pid_id}"
            )
        self._tally.add_remote(len(data))
        return data


class PrefetchedPages:
    """Remote pages pulled ahead over a second channel while faults go to the source first.

    CRIU's lazy-pages daemon asks for one chunk per round trip and falls back to 64 KiB after
    every fault, so on a slow, long link the faulted-pages phase is bound by the round trip.
    Here a background task pulls every page in ``wanted`` in large chunks (``prefetch``, its
    own connection), and a request the cache can answer returns at once; a page not yet
    there is fetched on demand through ``demand`` (the fault path). Pages already handed to
    the daemon are not prefetched again.
    """

    def __init__(
        self,
        demand: PageSource,
        prefetch: Fetch,
        wanted: Mapping[int, Collection[int]],
        *,
        chunk_pages: int = 256,
    ) -> None:
        self.demand = demand
        self._prefetch = prefetch
        self._wanted = {pid: sorted(v) for pid, v in wanted.items()}
        self._chunk = chunk_pages
        self._cache: dict[tuple[int, int], bytes] = {}
        self._served: set[tuple[int, int]] = set()
        self._tally = PageTally()
        self._task: asyncio.Task[None] | None = None
        self._inflight: tuple[int, int, int, asyncio.Future[None]] | None = None
        self.error: BaseException | None = None

    @property
    def tally(self) -> PageTally:
        d = self.demand.tally
        t = self._tally
        return PageTally(
            local_pages=d.local_pages,
            local_bytes=d.local_bytes,
            remote_pages=d.remote_pages + t.remote_pages,
            remote_bytes=d.remote_bytes + t.remote_bytes,
            remote_requests=d.remote_requests + t.remote_requests,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prefetch-pages")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _chunks(self) -> Iterator[tuple[int, int, int]]:
        """(pid, vaddr, pages) of contiguous runs of wanted pages, at most a chunk each."""
        for pid, vaddrs in self._wanted.items():
            start, count = 0, 0
            for v in vaddrs:
                if count and (v != start + count * PAGE_SIZE or count == self._chunk):
                    yield pid, start, count
                    count = 0
                if not count:
                    start = v
                count += 1
            if count:
                yield pid, start, count

    async def _run(self) -> None:
        try:
            for pid, first, pages in self._chunks():
                await self._pull(pid, first, pages)
        except (FogmigError, OSError) as exc:
            # Faults still reach the source on their own path; only the head start is lost.
            self.error = exc
            log.warning("page prefetch stopped: %s", exc)

    async def _pull(self, pid: int, vaddr: int, count: int) -> None:
        # Skip the head of the run the daemon already has.
        while count and (pid, vaddr) in self._served:
            vaddr += PAGE_SIZE
            count -= 1
        while count:
            # Only the run up to the next page the daemon already has: a fault may have
            # fetched pages inside this chunk since it was planned.
            run = 1
            while run < count and (pid, vaddr + run * PAGE_SIZE) not in self._served:
                run += 1
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._inflight = (pid, vaddr, run, done)
            try:
                data = await self._prefetch(pid, vaddr, run)
            finally:
                self._inflight = None
                done.set_result(None)
            if not data:
                return
            self._tally.add_remote(len(data))
            n = len(data) // PAGE_SIZE
            for i in range(n):
                key = (pid, vaddr + i * PAGE_SIZE)
                if key not in self._served:
                    self._cache[key] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            vaddr += n * PAGE_SIZE
            count -= n
            while count and (pid, vaddr) in self._served:
                vaddr += PAGE_SIZE
                count -= 1

    async def read(self, pid_id: int, vaddr: int, nr_pages: int) -> bytes:
        inflight = self._inflight
        if inflight is not None:
            pid, start, count, done = inflight
            if pid == pid_id and start <= vaddr < start + count * PAGE_SIZE:
                # The page is on its way already: wait for it rather than fetch it twice.
                await asyncio.shield(done)
        pieces: list[bytes] = []
        addr = vaddr
        while len(pieces) < nr_pages:
            page = self._cache.pop((pid_id, addr), None)
            if page is None:
                break
            pieces.append(page)
            addr += PAGE_SIZE
        if pieces:
            data = b"".join(pieces)
        else:
            data = await self.demand.read(pid_id, vaddr, nr_pages)
        for i in range(len(data) // PAGE_SIZE):
            self._served.add((pid_id, vaddr + i * PAGE_SIZE))
        return data


class LayeredPages:
    """Hybrid: pages in ``remote_vaddrs[pid_id]`` come from ``remote``, the rest from ``local``.

    ``local`` is the pre-copy base already at the destination; ``remote_vaddrs`` lists, per
    task, the page addresses whose content changed (or appeared) since that base, as the source
    computed them. A request that mixes both is split into runs; remote runs are fetched
    concurrently.
    """

    def __init__(
        self,
        local: PageSource,
        remote: PageSource,
        remote_vaddrs: Mapping[int, Collection[int]],
    ) -> None:
        self.local = local
        self.remote = remote
        self._remote_vaddrs = {pid: frozenset(v) for pid, v in remote_vaddrs.items()}
        self._tally = PageTally()

    @property
    def tally(self) -> PageTally:
        return self._tally

    @property
    def remote_page_count(self) -> int:
        return sum(len(v) for v in self._remote_vaddrs.values())

    def _runs(self, pid_id: int, vaddr: int, nr_pages: int) -> list[tuple[bool, int, int]]:
        """(remote?, vaddr, nr_pages) runs covering the request in address order."""
        changed = self._remote_vaddrs.get(pid_id, frozenset())
        runs: list[tuple[bool, int, int]] = []
        for i in range(nr_pages):
            addr = vaddr + i * PAGE_SIZE
            remote = addr in changed
            if runs and runs[-1][0] == remote:
                runs[-1] = (remote, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((remote, addr, 1))
        return runs

    async def read(self, pid_id: int, vaddr: int, nr_pages: int) -> bytes:
        runs = self._runs(pid_id, vaddr, nr_pages)

        async def one(remote: bool, addr: int, n: int) -> bytes:
            return await (self.remote if remote else self.local).read(pid_id, addr, n)

        results = await asyncio.gather(*(one(*run) for run in runs), return_exceptions=True)
        answer: list[tuple[bool, bytes]] = []
        for (remote, addr, n), result in zip(runs, results, strict=True):
            if isinstance(result, PageNotFoundError) and addr != vaddr:
                break  # the data ends here: answer with the prefix before it
            if isinstance(result, BaseException):
                raise result
            answer.append((remote, result))
            if len(result) < n * PAGE_SIZE:
                break  # a short run ends the contiguous prefix
        for remote, data in answer:
            if remote:
                self._tally.add_remote(len(data))
            else:
                self._tally.add_local(len(data))
        return b"".join(data for _, data in answer)


# --------------------------------------------------------------------------- the server


@dataclass(frozen=True, slots=True)
class LazyServeStats:
    """What the page server delivered; times are on the server's clock (monotonic seconds).

    ``faulted_pages_bytes`` and ``faulted_pages_transfer_time`` are the migration metrics.
    """

    connections: int
    requests: int
    pages_served: int
    bytes_served: int
    local_pages: int
    local_bytes: int
    remote_pages: int
    remote_bytes: int
    remote_requests: int
    first_request_at: float | None
    last_request_at: float | None
    last_page_at: float | None
    closed_cleanly: bool
    error: str | None

    @property
    def faulted_pages_bytes(self) -> int:
        return self.bytes_served

    @property
    def faulted_pages_transfer_time(self) -> float | None:
        if self.first_request_at is None or self.last_page_at is None:
            return None
        return self.last_page_at - self.first_request_at


@dataclass(slots=True)
class _Counters:
    connections: int = 0
    requests: int = 0
    pages_served: int = 0
    bytes_served: int = 0
    first_request_at: float | None = None
    last_request_at: float | None = None
    last_page_at: float | None = None
    closed_cleanly: bool = False
    error: str | None = None


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_socket(host: str, port: int, netns: str | None = None) -> socket.socket:
    """A listening TCP socket bound in the named network namespace (or this one).

    ``setns`` switches only the calling thread, so a short-lived thread enters the namespace,
    creates the socket and ends; the socket stays in that namespace and the event loop's thread
    never leaves its own.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(4)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    if netns is None:
        return make()
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def in_namespace() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(target)
                    try:
                        made.append(make())
                    finally:
                        _setns(own)
                finally:
                    os.close(target)
            finally:
                os.close(own)
        except BaseException as exc:  # handed to the caller's thread below
            failed.append(exc)

    thread = threading.Thread(target=in_namespace, name=f"listen-{netns}")
    thread.start()
    thread.join()
    if failed:
        raise PageServerError(
            f"cannot listen on {host}:{port} in network namespace {netns}: {failed[0]}"
        ) from failed[0]
    return made[0]


class LazyPageServer:
    """CRIU's page-server protocol, lazy side, answered from a :class:`PageSource`.

    The daemon reaches it through :meth:`channel` (a socket pair, preferred: nothing listens)
    or over TCP on ``host:port`` (port 0 picks a free one, see :attr:`port`) in network
    namespace ``netns``; ``host=None`` opens no listener. Over TCP only loopback makes sense:
    the protocol has no authentication. One session at a time; further connections are
    refused. Requests are read ahead and fetched concurrently (up to ``max_in_flight``),
    replies go out in request order as the daemon expects. A request the source cannot answer
    ends the session, which makes the daemon fail: never a silent hole in restored memory.
    """

    def __init__(
        self,
        *,
        host: str | None = "127.0.0.1",
        port: int = 0,
        source: PageSource,
        netns: str | None = None,
        max_in_flight: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self._port = port
        self.source = source
        self.netns = netns
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._counters = _Counters()
        self._served: dict[int, list[tuple[int, int]]] = {}
        self._server: asyncio.Server | None = None
        self._session: asyncio.Task[None] | None = None
        self._channel_sessions: set[asyncio.Task[None]] = set()
        self._session_done = asyncio.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def stats(self) -> LazyServeStats:
        c = self._counters
        t = self.source.tally
        return LazyServeStats(
            connections=c.connections,
            requests=c.requests,
            pages_served=c.pages_served,
            bytes_served=c.bytes_served,
            local_pages=t.local_pages,
            local_bytes=t.local_bytes,
            remote_pages=t.remote_pages,
            remote_bytes=t.remote_bytes,
            remote_requests=t.remote_requests,
            first_request_at=c.first_request_at,
            last_request_at=c.last_request_at,
            last_page_at=c.last_page_at,
            closed_cleanly=c.closed_cleanly,
            error=c.error,
        )

    @property
    def served_pages(self) -> dict[int, set[int]]:
        """Per task, the image address of every page sent to the daemon (for its verdict)."""
        return {
            pid: {vaddr + i * PAGE_SIZE for vaddr, nr in ranges for i in range(nr)}
            for pid, ranges in self._served.items()
        }

    async def start(self) -> None:
        if self.host is None:
            return  # channel only
        sock = listen_socket(self.host, self._port, self.netns)
        self._port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._on_connect, sock=sock)
        log.info(
            "lazy page server on %s:%d%s",
            self.host,
            self._port,
            f" in {self.netns}" if self.netns else "",
        )

    async def channel(self) -> socket.socket:
        """A connected socket for the daemon's ``--ps-socket``; its session starts now.

        A Unix socket pair: no port to find, guard or race for, and no TCP cork delay.
        Hand it to :class:`LazyPagesDaemon` (which passes it on and closes this copy).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        self._channel_sessions.add(asyncio.create_task(self._on_connect(reader, writer)))
        return theirs

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        pending = [t for t in (self._session, *self._channel_sessions) if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._channel_sessions.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_session(self, timeout: float | None = None) -> LazyServeStats:
        """Wait until the daemon's session ends (cleanly or not) and return the stats."""
        async with asyncio.timeout(timeout):
            await self._session_done.wait()
        return self.stats

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._session is not None and not self._session.done():
            log.warning("refused a second page-server connection from %s", _peer(writer))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        self._session_done.clear()
        self._session = asyncio.current_task()
        self._counters.connections += 1
        log.info("lazy-pages daemon connected from %s", _peer(writer))
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception as exc:
            # Whatever broke (the source, the protocol, the socket), the daemon must see the
            # session end and fail; the error is kept for the verdict.
            self._counters.error = f"{type(exc).__name__}: {exc}"
            log.warning("lazy page session failed: %s", self._counters.error)
            writer.transport.abort()
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            self._session_done.set()
        log.info("lazy page session over: %s", self.stats)

    async def _answer(self, request: GetPages) -> bytes:
        data = await self.source.read(request.pid_id, request.vaddr, request.nr_pages)
        nr = len(data) // PAGE_SIZE
        if nr == 0 or len(data) % PAGE_SIZE or nr > request.nr_pages:
            raise PageServerError(
                f"page source answered {len(data)} bytes for {request.nr_pages} pages"
            )
        return data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = PageServerConnection()
        pending: asyncio.Queue[tuple[GetPages, asyncio.Task[bytes]] | None] = asyncio.Queue(
            self._max_in_flight
        )
        answers: set[asyncio.Task[bytes]] = set()

        async def read_requests() -> bool:
            """Queue an answer per GET; True at the daemon's close, False at EOF."""
            while True:
                data = await reader.read(65536)
                if not data:
                    if conn.pending_bytes:
                        raise ProtocolError("connection closed inside a request header")
                    await pending.put(None)
                    return False
                for event in conn.receive(data):
                    if isinstance(event, CloseRequest):
                        await pending.put(None)
                        return True
                    now = self._clock()
                    c = self._counters
                    c.requests += 1
                    if c.first_request_at is None:
                        c.first_request_at = now
                    c.last_request_at = now
                    task = asyncio.create_task(self._answer(event))
                    answers.add(task)
                    task.add_done_callback(answers.discard)
                    await pending.put((event, task))

        async def write_replies() -> None:
            """Send the answers in request order, as the daemon matches them."""
            while (item := await pending.get()) is not None:
                request, task = item
                data = await task
                nr = len(data) // PAGE_SIZE
                writer.write(pages_reply_header(request.request, nr))
                writer.write(data)
                await writer.drain()
                self._served.setdefault(request.pid_id, []).append((request.vaddr, nr))
                c = self._counters
                c.pages_served += nr
                c.bytes_served += len(data)
                c.last_page_at = self._clock()
                log.debug(
                    "served %d/%d pages at %#x of task %d",
                    nr,
                    request.nr_pages,
                    request.vaddr,
                    request.pid_id,
                )

        reading = asyncio.create_task(read_requests())
        writing = asyncio.create_task(write_replies())
        try:
            # A failed answer must stop the reader too: the daemon waits for that answer and
            # would never send anything that wakes the reader up.
            await asyncio.wait({reading, writing}, return_when=asyncio.FIRST_EXCEPTION)
            if writing.done() and writing.exception() is not None:
                await writing  # re-raises the failed answer
            closed = await reading
        finally:
            leftovers: list[asyncio.Task[Any]] = [reading, writing, *answers]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
        if not closed:
            raise PageServerError("the lazy-pages daemon hung up without closing the session")
        writer.write(CLOSE_STATUS_OK)
        await writer.drain()
        self._counters.closed_cleanly = True
        log.debug("session closed by the daemon, status sent")
        # The daemon closes its end after reading the status; wait for it (no TIME_WAIT here).
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reader.read(1), timeout=5.0)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


# --------------------------------------------------------------------------- the daemon


def parse_lazy_pages_log(text: str) -> list[tuple[int, int]]:
    """Every ``UFFD transferred pages: (copied/total)`` of a lazy-pages log, one per task."""
    return [(t.copied, t.total) for t in parse_lazy_pages_events(text).tasks]


@dataclass(frozen=True, slots=True)
class TaskTransfer:
    """One task's summary line: ``copied`` of its ``total`` lazy pages went in through uffd."""

    pid: int
    copied: int
    total: int


@dataclass(frozen=True, slots=True)
class AddressEvent:
    """A change the restored task made to its own lazy memory, as the daemon logged it.

    ``remove`` (MADV_DONTNEED and the like) and ``unmap`` release ``[start, start+length)``;
    ``remap`` (mremap) moves that range to ``to``. Addresses are the task's at that moment.
    """

    pid: int
    kind: str
    start: int
    length: int
    to: int | None = None


@dataclass(frozen=True, slots=True)
class LazyPagesLog:
    tasks: list[TaskTransfer]
    events: list[AddressEvent]


_LOG_LINE_RE = re.compile(
    r"(?P<pid>\d+)-\d+: (?:"
    r"UFFD transferred pages: \((?P<copied>\d+)/(?P<total>\d+)\)"
    r"|(?P<kind>REMOVE|UNMAP): (?P<start>[0-9a-f]+)\((?P<len>[0-9a-f]+)\)"
    r"|REMAP: (?P<from>[0-9a-f]+) -> (?P<to>[0-9a-f]+) \((?P<rlen>\d+)\)"
    r")"
)


def parse_lazy_pages_events(text: str) -> LazyPagesLog:
    """The per-task summaries and, in log order, the address events of a ``-v4`` log."""
    tasks: list[TaskTransfer] = []
    events: list[AddressEvent] = []
    for m in _LOG_LINE_RE.finditer(text):
        pid = int(m["pid"])
        if m["copied"] is not None:
            tasks.append(TaskTransfer(pid, int(m["copied"]), int(m["total"])))
        elif m["kind"] is not None:
            # CRIU prints these two in hex without 0x: "%llx(%llx)".
            events.append(
                AddressEvent(pid, m["kind"].lower(), int(m["start"], 16), int(m["len"], 16))
            )
        else:
            events.append(
                AddressEvent(pid, "remap", int(m["from"], 16), int(m["rlen"]), int(m["to"], 16))
            )
    return LazyPagesLog(tasks, events)


def released_and_missing(
    lazy: Collection[int], served: Collection[int], events: list[AddressEvent]
) -> tuple[int, int]:
    """Judge one task's short transfer: (pages it released itself, pages that never arrived).

    ``lazy`` and ``served`` are image addresses (what the daemon asks the server for);
    ``events`` are that task's, in order, at run-time addresses, so remaps are followed.
    A page counts as released when a remove/unmap covered it; missing when it was neither
    served nor released: the restored memory has a hole.
    """
    image = np.fromiter(lazy, dtype=np.int64, count=len(lazy))
    runtime = image.copy()
    released = np.zeros(image.size, dtype=bool)
    for ev in events:
        inside = (runtime >= ev.start) & (runtime < ev.start + ev.length) & ~released
        if ev.kind == "remap":
            assert ev.to is not None
            runtime[inside] += ev.to - ev.start
        else:
            released |= inside
    served_mask = np.isin(image, np.fromiter(served, dtype=np.int64, count=len(served)))
    return int(released.sum()), int((~released & ~served_mask).sum())


@dataclass(frozen=True, slots=True)
class LazyPagesOutcome:
    """How the destination's lazy-pages daemon ended: the only judge of a lazy transfer.

    A task passes with ``copied == total``, or, when the server's record of served pages was
    given, if every lazy page it lacks was released by the task itself before it was needed
    (``missing`` 0): a service that frees memory during the lazy phase is healthy, and a strict
    N/N would condemn it.
    """

    returncode: int | None
    tasks: list[TaskTransfer]
    log_path: Path
    expected_tasks: int | None = None
    argv: list[str] = field(default_factory=list)
    released: dict[int, int] = field(default_factory=dict)
    missing: dict[int, int] | None = None

    @property
    def transfers(self) -> list[tuple[int, int]]:
        return [(t.copied, t.total) for t in self.tasks]

    @property
    def pages_transferred(self) -> int:
        return sum(t.copied for t in self.tasks)

    @property
    def pages_expected(self) -> int:
        return sum(t.total for t in self.tasks)

    def _task_ok(self, task: TaskTransfer) -> bool:
        if task.copied == task.total:
            return True
        if self.missing is None or self.missing.get(task.pid, 1) != 0:
            return False
        return task.copied + self.released.get(task.pid, 0) >= task.total

    @property
    def ok(self) -> bool:
        if self.returncode != 0 or not self.tasks:
            return False
        if self.expected_tasks is not None and len(self.tasks) < self.expected_tasks:
            return False
        return all(self._task_ok(t) for t in self.tasks)

    def describe(self) -> str:
        parts = []
        for t in self.tasks:
            part = f"{t.pid}: {t.copied}/{t.total}"
            if t.copied != t.total and t.pid in self.released:
                part += f" ({self.released[t.pid]} released by the task"
                if self.missing is not None:
                    part += f", {self.missing.get(t.pid, 0)} missing"
                part += ")"
            parts.append(part)
        done = ", ".join(parts) or "no task reported"
        return f"lazy-pages exited {self.returncode}, pages transferred per task: {done}"

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise LazyPagesFailed(
                f"lazy page transfer incomplete ({self.describe()})",
                cmd=self.argv,
                returncode=self.returncode,
                log_path=self.log_path,
                hint="the restored service lacks memory pages: stop it; the source's "
                "complete dump is still the safe copy",
            )


class LazyPagesDaemon:
    """``criu lazy-pages --page-server`` at the destination, fed from a local page server.

    The daemon reaches the server through ``channel`` (from :meth:`LazyPageServer.channel`:
    nothing listens, nothing else can connect) or through TCP ``address:port`` in ``netns``
    (the namespace where the server listens). The daemon talks to ``restore --lazy-pages``
    through ``lazy-pages.socket`` in ``work_dir``, not the network, so it need not share the
    restored service's namespace.

    Entering starts the daemon and returns once that socket exists, so the restore (with the
    same work directory) can run. :meth:`wait` returns the outcome; leaving kills a daemon that
    is still running. Over TCP the daemon exits about 0.2 s after its last page (it sends its
    close on a corked socket): time the transfer with the server's ``last_page_at``.
    """

    def __init__(
        self,
        *,
        image_dir: Path,
        work_dir: Path,
        channel: socket.socket | None = None,
        port: int | None = None,
        address: str = "127.0.0.1",
        netns: str | None = None,
        criu: str = "criu",
        log_name: str = "lazy-pages.log",
        expected_tasks: int | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if (channel is None) == (port is None):
            raise ValueError("give the daemon either a channel or a port")
        self.image_dir = image_dir
        self.work_dir = work_dir
        self.log_path = work_dir / log_name
        self.expected_tasks = expected_tasks
        self._start_timeout = start_timeout
        self._channel = channel
        if channel is not None:
            # CRIU's --ps-socket: talk over an inherited, already connected socket.
            server_args = ["--ps-socket", str(channel.fileno())]
        else:
            server_args = ["--address", address, "--port", str(port)]
        # -v4: the per-task "UFFD transferred pages" summary is a debug line.
        self.argv = in_netns(
            netns,
            [
                *(criu, "lazy-pages", "--page-server", *server_args),
                *("-D", str(image_dir), "-W", str(work_dir), "-v4", "--log-file", log_name),
            ],
        )
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def socket_path(self) -> Path:
        return self.work_dir / LAZY_SOCKET_NAME

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _error(self, message: str, returncode: int | None) -> LazyPagesFailed:
        return LazyPagesFailed(
            message, cmd=self.argv, returncode=returncode, log_path=self.log_path
        )

    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                pass_fds=() if self._channel is None else (self._channel.fileno(),),
            )
        except FileNotFoundError as exc:
            raise self._error("criu not found", None) from exc
        finally:
            # The daemon holds its own copy; ours would keep the server from seeing the
            # daemon go away.
            if self._channel is not None:
                self._channel.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        while not self.socket_path.exists():
            if self._proc.returncode is not None:
                raise self._error(
                    "lazy-pages daemon exited before it listened", self._proc.returncode
                )
            if loop.time() > deadline:
                await self.kill()
                raise self._error(f"no {LAZY_SOCKET_NAME} after {self._start_timeout} s", None)
            await asyncio.sleep(0.01)
        log.info("lazy-pages daemon %d ready in %s", self._proc.pid, self.work_dir)

    async def wait(
        self,
        timeout: float | None = None,
        *,
        server: LazyPageServer | None = None,
    ) -> LazyPagesOutcome:
        """Wait for the daemon to finish (all pages in, or failure) and judge it.

        With ``server`` (the page server that fed this daemon) a task that released part of
        its memory during the transfer can still pass, as long as every page it lacks is one
        it released; without it only a full N/N does.
        """
        if self._proc is None:
            raise self._error("lazy-pages daemon was never started", None)
        async with asyncio.timeout(timeout):
            returncode = await self._proc.wait()
        served = server.served_pages if server is not None else None
        return await asyncio.to_thread(self._outcome, returncode, served)

    def _outcome(
        self, returncode: int | None, served: Mapping[int, Collection[int]] | None
    ) -> LazyPagesOutcome:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        parsed = parse_lazy_pages_events(text)
        released: dict[int, int] = {}
        missing: dict[int, int] | None = None
        short = [t for t in parsed.tasks if t.copied != t.total]
        if served is not None:
            missing = {}
            lazy = lazy_vaddrs(self.image_dir) if short else {}
            for t in short:
                if t.pid not in lazy:
                    missing[t.pid] = t.total - t.copied
                    continue
                events = [e for e in parsed.events if e.pid == t.pid]
                released[t.pid], missing[t.pid] = released_and_missing(
                    lazy[t.pid], served.get(t.pid, ()), events
                )
        outcome = LazyPagesOutcome(
            returncode=returncode,
            tasks=parsed.tasks,
            log_path=self.log_path,
            expected_tasks=self.expected_tasks,
            argv=list(self.argv),
            released=released,
            missing=missing,
        )
        log.info("%s", outcome.describe())
        return outcome

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()
