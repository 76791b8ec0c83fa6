"""Which memory a running service touched lately, per mapping, from the kernel's accessed bits.

Writing ``1`` to ``/proc/<pid>/clear_refs`` clears the accessed bits of a process's pages;
afterwards each mapping in ``/proc/<pid>/smaps`` says how much of it was referenced since.
This kernel has neither soft-dirty tracking nor idle-page tracking, so a mapping is the finest
grain there is. A lazy restore streams the mappings a service touched most first: they are
what it touches again as soon as it runs (docs/architecture.md, "The frozen window and the
streamed pages").

Finer, at the page level: two digests of every resident page, one when the migration begins
and one just before the freeze, give the pages the service wrote in between
(:func:`written_pages`); a lazy migration ships those with the execution state.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
_REFERENCED = re.compile(r"^Referenced:\s+(\d+) kB$")


@dataclass(frozen=True, slots=True)
class Region:
    """One mapping: ``[start, end)`` and the bytes of it referenced since the last clear."""

    start: int
    end: int
    referenced: int

    @property
    def density(self) -> float:
        return self.referenced / (self.end - self.start) if self.end > self.start else 0.0


def parse_smaps(text: str) -> list[Region]:
    """The mappings of an smaps file with their referenced bytes."""
    regions: list[Region] = []
    start = end = -1
    for line in text.splitlines():
        m = _MAPPING.match(line)
        if m:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            continue
        m = _REFERENCED.match(line)
        if m and start >= 0:
            regions.append(Region(start, end, int(m.group(1)) * 1024))
            start = end = -1
    return regions


def _children(pid: int, proc: Path) -> Iterator[int]:
    with contextlib.suppress(OSError):
        for task in (proc / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                yield from (int(c) for c in (task / "children").read_text().split())


def process_tree(init_pid: int, *, proc: Path = PROC) -> dict[int, int]:
    """Host pid -> pid inside the container's namespace, for ``init_pid`` and its descendants
    (the id CRIU names a task's pagemap with)."""
    tree: dict[int, int] = {}
    todo = [init_pid]
    level: int | None = None  # the container's level in NSpid (its init's innermost)
    while todo and len(tree) < 4096:
        pid = todo.pop()
        if pid in tree:
            continue
        try:
            status = (proc / str(pid) / "status").read_text()
        except OSError:
            continue
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if level is None:
            level = max(0, len(nspid) - 1)
        # A process in a namespace nested in the container's has more levels: CRIU names it
        # by its pid at the container's level.
        tree[pid] = int(nspid[level]) if len(nspid) > level else pid
        todo.extend(_children(pid, proc))
    return tree


def clear_accessed(init_pid: int, *, proc: Path = PROC) -> int:
    """Clear the accessed bits of every process of the container; how many were cleared."""
    cleared = 0
    for pid in process_tree(init_pid, proc=proc):
        with contextlib.suppress(OSError):
            (proc / str(pid) / "clear_refs").write_text("1\n")
            cleared += 1
    return cleared


def accessed_regions(init_pid: int, *, proc: Path = PROC) -> dict[int, list[Region]]:
    """Per task of the container (by its pid in the namespace), its mappings and what of them
    was referenced since :func:`clear_accessed`."""
    out: dict[int, list[Region]] = {}
    for pid, nspid in process_tree(init_pid, proc=proc).items():
        with contextlib.suppress(OSError):
            out[nspid] = parse_smaps((proc / str(pid) / "smaps").read_text())
    return out


# ---- which pages the service wrote lately ----------------------------------------------------

PAGE = 4096
BULK_MAPPING_BYTES = 32 * 1024 * 1024
"""A mapping this large is bulk state (a buffer written at its own pace, as the sensor's
state): the page written last there is not the one touched next, so none of it counts as
the working set."""
_PRESENT = 1 << 63
_FILE = 1 << 61  # a page-cache page (or shared anonymous): not a private copy
_PAGEMAP_CHUNK = 4096  # pagemap entries read at a time (32 KiB)
MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
"""One line of ``/proc/<pid>/maps``: start, end, permissions, name."""
SPECIAL_MAPPINGS = frozenset({"[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"})
"""Mappings the kernel provides: never in a dump's pagemaps, and [vsyscall] cannot be read."""


def resident_pages(
    pagemap_fd: int, start: int, end: int, *, private: bool = False
) -> Iterator[int]:
    """The addresses of the resident pages of ``[start, end)``, by the process's open
    ``/proc/<pid>/pagemap``; with ``private``, only those not shared with a file. Reading an
    absent page through ``mem`` would fault it in, so only these are read."""
    for first in range(start, end, _PAGEMAP_CHUNK * PAGE):
        n = min(_PAGEMAP_CHUNK, (end - first) // PAGE)
        raw = os.pread(pagemap_fd, n * 8, (first // PAGE) * 8)
        for i, entry in enumerate(struct.unpack(f"<{len(raw) // 8}Q", raw)):
            if entry & _PRESENT and not (private and entry & _FILE):
                yield first + i * PAGE


@dataclass(slots=True)
class PageDigests:
    """One task's resident pages in address order: their CRC-32 and the size of the mapping
    that holds each (compact: a 90 MB process costs about 400 KB here)."""

    vaddrs: array[int] = field(default_factory=lambda: array("Q"))
    crcs: array[int] = field(default_factory=lambda: array("I"))
    mapping_sizes: array[int] = field(default_factory=lambda: array("Q"))

    def add(self, vaddr: int, crc: int, mapping_size: int) -> None:
        self.vaddrs.append(vaddr)
        self.crcs.append(crc)
        self.mapping_sizes.append(mapping_size)

    def __len__(self) -> int:
        return len(self.vaddrs)


def private_writable(maps_text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of every private writable mapping in a ``/proc/<pid>/maps`` text: where
    a process's own data lives (heap, stacks, anonymous memory, libraries' data)."""
    out: list[tuple[int, int]] = []
    for line in maps_text.splitlines():
        m = MAPS_LINE.match(line)
        if m is None:
            continue
        perms, name = m.group(3), m.group(4).strip()
        if perms[1] == "w" and perms[3] == "p" and name not in SPECIAL_MAPPINGS:
            out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out


def _task_digests(pid: int, proc: Path) -> PageDigests:
    digests = PageDigests()
    base = proc / str(pid)
    mappings = sorted(private_writable((base / "maps").read_text()))
    pagemap = os.open(base / "pagemap", os.O_RDONLY)
    try:
        mem = os.open(base / "mem", os.O_RDONLY)
    except OSError:
        os.close(pagemap)
        raise
    try:
        for start, end in mappings:
            if end - start >= BULK_MAPPING_BYTES:
                continue  # never the working set (ranked_written): not read at all
            for vaddr in resident_pages(pagemap, start, end):
                with contextlib.suppress(OSError):
                    digests.add(vaddr, zlib.crc32(os.pread(mem, PAGE, vaddr)), end - start)
    finally:
        os.close(mem)
        os.close(pagemap)
    return digests


def page_digests(init_pid: int, *, proc: Path = PROC) -> dict[int, PageDigests]:
    """Per task of the container (by its pid in the namespace), a digest of every resident
    page of its private writable mappings below :data:`BULK_MAPPING_BYTES`. Read while the
    service runs (a few hundredths of a second for the sensor service); it is not stopped,
    so a page written meanwhile may read half-old: that only makes it look written, which it
    was."""
    out: dict[int, PageDigests] = {}
    for pid, nspid in process_tree(init_pid, proc=proc).items():
        with contextlib.suppress(OSError):
            out[nspid] = _task_digests(pid, proc)
    return out


def ranked_written(
    before: dict[int, PageDigests], after: dict[int, PageDigests]
) -> list[tuple[int, int]]:
    """``(task, vaddr)`` of the pages whose content changed (or that appeared) between two
    :func:`page_digests`, the pages of the smallest mappings first.

    In an interpreter, touching an object writes it (its reference count), so these are the
    pages the service works on: what it touches first once it runs again. Heaps, stacks and
    interpreter structures come first; mappings of :data:`BULK_MAPPING_BYTES` or more are
    left out.
    """
    found: list[tuple[int, int, int]] = []  # (mapping size, task, vaddr)
    for task, now in after.items():
        if not len(now):
            continue
        old = before.get(task, PageDigests())
        j = 0
        for i, vaddr in enumerate(now.vaddrs):
            # Both in address order: walk them together.
            while j < len(old) and old.vaddrs[j] < vaddr:
                j += 1
            size = now.mapping_sizes[i]
            if size >= BULK_MAPPING_BYTES:
                continue
            if j >= len(old) or old.vaddrs[j] != vaddr or old.crcs[j] != now.crcs[i]:
                found.append((size, task, vaddr))
    found.sort()
    return [(task, vaddr) for _, task, vaddr in found]


def by_task(pages: list[tuple[int, int]]) -> dict[int, list[int]]:
    """``(task, vaddr)`` pairs as sorted addresses per task."""
    out: dict[int, list[int]] = {}
    for task, vaddr in pages:
        out.setdefault(task, []).append(vaddr)
    for vaddrs in out.values():
        vaddrs.sort()
    return out


def written_pages(
    before: dict[int, PageDigests], after: dict[int, PageDigests], *, limit: int
) -> dict[int, list[int]]:
    """The first ``limit`` of :func:`ranked_written`, per task."""
    return by_task(ranked_written(before, after)[: max(0, limit)])
