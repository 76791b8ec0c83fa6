"""A live copy of the pages a lazy dump keeps, read while the service runs.

A lazy restore needs some pages at once, before any fault can be served: CRIU makes only
private anonymous memory lazy, so the pages the service wrote in its file mappings (an
interpreter's static objects, libraries' data and relocations) and its main stack travel
with the execution state, inside the frozen window: about 1.9 MB of the sensor service,
0.43 MB compressed, 0.5 s on the mobility link. Almost none of them change within a second,
so post-copy reads them here from ``/proc/<pid>/mem`` while the service runs, ships that
copy ahead, and after the freeze ships each kept page only as its difference from the copy
(``migration/lazy/kept``).

Only resident, anonymous pages are read (the pagemap's present bit set, its file bit clear):
a page still shared with its file is not in a dump, and reading an absent page through
``mem`` would fault it in. A page written while it is read may read half-old; the delta
after the freeze takes care of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from fogmig.platform.runtime.access import PROC, process_tree

PAGE = 4096
_PRESENT = 1 << 63
_FILE = 1 << 61  # a page-cache page (or shared anonymous): not a private copy
_CHUNK = 4096  # pagemap entries read at a time
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
_SPECIAL = frozenset({"[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"})


@dataclass(slots=True)
class TaskPages:
    """One task's pages, in address order: their addresses and their bytes back to back."""

    vaddrs: array[int] = field(default_factory=lambda: array("Q"))
    data: bytearray = field(default_factory=bytearray)

    def __len__(self) -> int:
        return len(self.vaddrs)


def kept_mappings(maps_text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of the private mappings whose pages a lazy dump keeps: those backed
    by a file and the main stack (CRIU's ``vma_entry_can_be_lazy`` excludes both)."""
    out: list[tuple[int, int]] = []
    for line in maps_text.splitlines():
        m = _MAPS_LINE.match(line)
        if m is None:
            continue
        perms, name = m.group(3), m.group(4).strip()
        if perms[3] != "p" or perms[0] != "r" or name in _SPECIAL:
            continue
        if name.startswith("/") or name == "[stack]":
            out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out


def _task_pages(pid: int, proc: Path) -> TaskPages:
    pages = TaskPages()
    base = proc / str(pid)
    mappings = sorted(kept_mappings((base / "maps").read_text()))
    pagemap = os.open(base / "pagemap", os.O_RDONLY)
    try:
        mem = os.open(base / "mem", os.O_RDONLY)
    except OSError:
        os.close(pagemap)
        raise
    try:
        for start, end in mappings:
            for first in range(start, end, _CHUNK * PAGE):
                n = min(_CHUNK, (end - first) // PAGE)
                raw = os.pread(pagemap, n * 8, (first // PAGE) * 8)
                for i, entry in enumerate(struct.unpack(f"<{len(raw) // 8}Q", raw)):
                    if not entry & _PRESENT or entry & _FILE:
                        continue
                    vaddr = first + i * PAGE
                    with contextlib.suppress(OSError):
                        page = os.pread(mem, PAGE, vaddr)
                        if len(page) == PAGE:
                            pages.vaddrs.append(vaddr)
                            pages.data += page
    finally:
        os.close(mem)
        os.close(pagemap)
    return pages


def kept_snapshot(init_pid: int, *, proc: Path = PROC) -> dict[int, TaskPages]:
    """Per task of the container (by its pid in the namespace, the id of its pagemap), a copy
    of the resident private pages of its file mappings and stack. A task that vanished or
    cannot be read is left out: its kept pages then travel whole after the freeze."""
    out: dict[int, TaskPages] = {}
    for pid, nspid in process_tree(init_pid, proc=proc).items():
        with contextlib.suppress(OSError):
            out[nspid] = _task_pages(pid, proc)
    return out
