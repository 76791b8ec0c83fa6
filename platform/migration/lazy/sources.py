"""Page sources: where the lazy page server gets the bytes of the pages it hands out.

The image on this node's disk (:class:`LocalImagePages`), the remote source node
(:class:`RemotePages`, streamed ahead by
:class:`~fogmig.platform.migration.lazy.stream.StreamedPages`), or both for hybrid
(:class:`LayeredPages`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import (
    LazyLayoutError,
    PageNotFoundError,
    PageServerError,
)
from fogmig.platform.migration.lazy.layout import layout_pagemaps, task_id
from fogmig.platform.runtime.pagemap import PagemapEntry

log = logging.getLogger(__name__)

# Reads above this size leave the event loop so a fault's single page is never stuck behind
# a 4 MiB background chunk coming off the disk.
_THREAD_READ_BYTES = 256 * 1024


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
    rest), or raises :class:`PageNotFoundError` if it has no page at ``vaddr``. ``fault``
    says that a process is blocked on the first page (the daemon's fault requests are for
    one page); a source may serve it before anything else.
    """

    @property
    def tally(self) -> PageTally: ...

    async def read(
        self, pid_id: int, vaddr: int, nr_pages: int, *, fault: bool = False
    ) -> bytes: ...

    def give_back(self, pid_id: int, vaddr: int, data: bytes) -> None:
        """Pages that :meth:`read` returned but the daemon did not get (a reply cut short):
        it will ask for them again, keep them at hand if that saves a fetch."""
        ...

    def note_request(self) -> None:
        """The daemon asked for something that :meth:`read` does not see (another source of
        a layered one answers it); its reply goes after those of every earlier request."""
        ...


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
        pagemaps = layout_pagemaps(image_dir)
        self._tasks: dict[int, _TaskPages] = {}
        for pagemap in pagemaps.values():
            task = task_id(pagemap)
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

    async def read(self, pid_id: int, vaddr: int, nr_pages: int, *, fault: bool = False) -> bytes:
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

    def give_back(self, pid_id: int, vaddr: int, data: bytes) -> None:
        pass  # read again from the disk when asked

    def note_request(self) -> None:
        pass  # nothing held back here

    def read_page(self, pid_id: int, vaddr: int) -> bytes:
        """One page, read on the caller's thread (for files built from a few pages)."""
        pages = self._tasks.get(pid_id)
        pieces = pages.pieces(vaddr, 1) if pages is not None else []
        if pages is None or not pieces:
            raise PageNotFoundError(pid_id, vaddr)
        self._tally.add_local(PAGE_SIZE)
        return self._read_sync(pages, pieces)

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

    async def read(self, pid_id: int, vaddr: int, nr_pages: int, *, fault: bool = False) -> bytes:
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

    def give_back(self, pid_id: int, vaddr: int, data: bytes) -> None:
        pass  # fetched again when asked (only used without a stream)

    def note_request(self) -> None:
        pass  # nothing held back here


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

    async def read(self, pid_id: int, vaddr: int, nr_pages: int, *, fault: bool = False) -> bytes:
        # A request answered from the base alone still comes after a remote one that the
        # stream holds back (the daemon takes replies in order): the stream must know of it.
        self.note_request()
        runs = self._runs(pid_id, vaddr, nr_pages)

        async def one(remote: bool, addr: int, n: int) -> bytes:
            source = self.remote if remote else self.local
            return await source.read(pid_id, addr, n, fault=fault and addr == vaddr)

        results = await asyncio.gather(*(one(*run) for run in runs), return_exceptions=True)
        answer: list[tuple[bool, bytes]] = []
        ended = False
        for (remote, addr, n), result in zip(runs, results, strict=True):
            if ended:
                # Fetched for nothing after the prefix ended: the stream keeps those pages.
                if remote and isinstance(result, bytes):
                    self.remote.give_back(pid_id, addr, result)
                continue
            if isinstance(result, PageNotFoundError) and addr != vaddr:
                ended = True  # the data ends here: answer with the prefix before it
                continue
            if isinstance(result, BaseException):
                raise result
            answer.append((remote, result))
            if len(result) < n * PAGE_SIZE:
                ended = True  # a short run ends the contiguous prefix
        for remote, data in answer:
            if remote:
                self._tally.add_remote(len(data))
            else:
                self._tally.add_local(len(data))
        return b"".join(data for _, data in answer)

    def note_request(self) -> None:
        self.local.note_request()
        self.remote.note_request()

    def give_back(self, pid_id: int, vaddr: int, data: bytes) -> None:
        changed = self._remote_vaddrs.get(pid_id, frozenset())
        for i in range(len(data) // PAGE_SIZE):
            addr = vaddr + i * PAGE_SIZE
            if addr in changed:
                self.remote.give_back(pid_id, addr, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
