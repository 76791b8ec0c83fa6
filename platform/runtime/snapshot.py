"""A live copy of a service's small memory, read while it runs: what post-copy sends ahead.

A lazy restore needs some pages at once, before any fault can be served: CRIU makes only
private anonymous memory lazy, so the pages the service wrote in its file mappings (an
interpreter's static objects, libraries' data and relocations) and its main stack travel
with the execution state, inside the frozen window: about 1.9 MB of the sensor service,
0.43 MB compressed, 0.5 s on the mobility link. And once it runs, the service reads its
heaps and interpreter structures at once, page after page, each a round trip when it is
lazy (8 s of a device's silence on the mobility link) and none of it visible beforehand
(this kernel tracks no page's reads). Almost none of those pages change within seconds, so
post-copy copies them here from ``/proc/<pid>/mem`` while the service runs: the kept pages,
then the private writable mappings smaller than :data:`BULK_MAPPING_BYTES` from the smallest
up, at most :data:`RESIDENT_SHARE` of the service's memory (its bulk state stays lazy). It
ships the copy ahead; after the freeze the destination restores each lazy page the copy
holds unchanged from it, and the kept pages travel as their difference from it
(``migration/lazy/kept``, ``migration/lazy/warm``).

Only resident, anonymous pages are read (the pagemap's present bit set, its file bit clear):
a page still shared with its file is not in a dump, and reading an absent page through
``mem`` would fault it in. A page written while it is read may read half-old; the delta
after the freeze takes care of it.
"""

from __future__ import annotations

import contextlib
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from fogmig.platform.runtime.access import (
    BULK_MAPPING_BYTES,
    MAPS_LINE,
    PAGE,
    PROC,
    SPECIAL_MAPPINGS,
    process_tree,
    resident_pages,
)

BULK_EDGE_BYTES = 2 << 20
"""How much of each end of a bulk mapping a live copy takes (interpreter arenas of 1 MiB merged
into it; the sensor's held 1.4 MB past its 75 MB buffer)."""
RESIDENT_SHARE = 0.25
"""The most of a task's resident anonymous memory a live copy takes beyond the kept pages:
the sensor service's runtime (13.5 MB of 94) fits, while a small service's state stays lazy."""


@dataclass(slots=True)
class TaskPages:
    """One task's pages, in address order: their addresses and their bytes back to back."""

    vaddrs: array[int] = field(default_factory=lambda: array("Q"))
    data: bytearray = field(default_factory=bytearray)

    def __len__(self) -> int:
        return len(self.vaddrs)


@dataclass(frozen=True, slots=True)
class Mapping:
    """One mapping a live copy may take; ``kept``: its pages travel with a lazy dump."""

    start: int
    end: int
    kept: bool

    @property
    def size(self) -> int:
        return self.end - self.start


def copied_mappings(maps_text: str, *, small_below: int = BULK_MAPPING_BYTES) -> list[Mapping]:
    """The private mappings a live copy may take, kept ones first, then the others from the
    smallest up: those whose pages a lazy dump keeps (backed by a file, and the main stack:
    CRIU's ``vma_entry_can_be_lazy`` excludes both) and the anonymous writable ones smaller
    than ``small_below`` (heaps, arenas, thread stacks; 0 takes none of them), and of the
    larger ones the :data:`BULK_EDGE_BYTES` at each end."""
    out: list[Mapping] = []
    for line in maps_text.splitlines():
        m = MAPS_LINE.match(line)
        if m is None:
            continue
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        perms, name = m.group(3), m.group(4).strip()
        if perms[3] != "p" or perms[0] != "r" or name in SPECIAL_MAPPINGS:
            continue
        kept = name.startswith("/") or name == "[stack]"
        if kept or (perms[1] == "w" and end - start < small_below):
            out.append(Mapping(start, end, kept))
        elif perms[1] == "w" and small_below > 0:
            # The kernel merges anonymous mappings that touch: an arena mapped next to a bulk
            # buffer becomes part of its mapping. Such neighbours sit at its ends.
            edge = min(BULK_EDGE_BYTES, (end - start) // 2)
            out += [Mapping(start, start + edge, False), Mapping(end - edge, end, False)]
    return sorted(out, key=lambda m: (not m.kept, m.size, m.start))


def _rss_anon(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _task_pages(pid: int, proc: Path, small_below: int, share: float) -> TaskPages:
    base = proc / str(pid)
    mappings = copied_mappings((base / "maps").read_text(), small_below=small_below)
    budget = share * _rss_anon((base / "status").read_text())
    chosen: list[int] = []
    pagemap = os.open(base / "pagemap", os.O_RDONLY)
    try:
        for m in mappings:
            resident = list(resident_pages(pagemap, m.start, m.end, private=True))
            # The kept pages travel anyway; the others only while the copy stays a small
            # part of the service (its bulk state is post-copy's to fetch lazily).
            if m.kept or (len(chosen) + len(resident)) * PAGE <= budget:
                chosen.extend(resident)
    finally:
        os.close(pagemap)
    chosen.sort()
    pages = TaskPages()
    mem = os.open(base / "mem", os.O_RDONLY)
    try:
        for vaddr in chosen:
            with contextlib.suppress(OSError):
                page = os.pread(mem, PAGE, vaddr)
                if len(page) == PAGE:
                    pages.vaddrs.append(vaddr)
                    pages.data += page
    finally:
        os.close(mem)
    return pages


def live_copy(
    init_pid: int,
    *,
    small_below: int = BULK_MAPPING_BYTES,
    share: float = RESIDENT_SHARE,
    proc: Path = PROC,
) -> dict[int, TaskPages]:
    """Per task of the container (by its pid in the namespace, the id of its pagemap), a copy
    of the resident private pages of its kept mappings, and of its other
    :func:`copied_mappings` while the copy stays under ``share`` of its resident anonymous
    memory. A task that vanished or cannot be read is left out: its pages then travel as if
    no copy had been made."""
    out: dict[int, TaskPages] = {}
    for pid, nspid in process_tree(init_pid, proc=proc).items():
        with contextlib.suppress(OSError):
            out[nspid] = _task_pages(pid, proc, small_below, share)
    return out
