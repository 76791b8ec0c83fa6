"""Which memory a running service touched lately, per mapping, from the kernel's accessed bits.

Writing ``1`` to ``/proc/<pid>/clear_refs`` clears the accessed bits of a process's pages;
afterwards each mapping in ``/proc/<pid>/smaps`` says how much of it was referenced since.
This kernel has neither soft-dirty tracking nor idle-page tracking, so a mapping is the finest
grain there is. A lazy restore streams the mappings a service touched most first: they are
what it touches again as soon as it runs (docs/architecture.md, "The frozen window and the
streamed pages").
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
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
    while todo and len(tree) < 4096:
        pid = todo.pop()
        if pid in tree:
            continue
        try:
            status = (proc / str(pid) / "status").read_text()
        except OSError:
            continue
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        tree[pid] = int(nspid[-1]) if nspid else pid
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
