"""Which lazy pages of a post-copy must come from the source: those its live copy lacks.

Post-copy sends a live copy of the service's small memory ahead of the freeze
(``runtime/snapshot``). After the freeze the source compares, page by page, every lazy page
of its complete image that the copy holds with the copy: an equal page is served at the
destination from the copy (``LayeredPages``), every other lazy page (the bulk state, a page
written since the copy, a page the copy never saw) comes from the source. The list goes with
the lazy layout in the file hybrid uses for its changed pages.

Exact by construction: the comparison is with the frozen service's own image, so a page
written while it was copied (read half-old) differs and goes remote. At the destination,
:func:`fill_from_base` turns the pages served from the copy into present pages of the image
before the restore: they are mapped with it, and never fault.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import LazyLayoutError
from fogmig.platform.migration.lazy.layout import (
    layout_pagemaps,
    layout_pages,
    lazy_vaddrs,
    task_id,
)
from fogmig.platform.runtime.pagemap import (
    PE_LAZY,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    flag_runs,
    locate,
    write_pagemap,
)


@dataclass(frozen=True, slots=True)
class WarmStats:
    """What :func:`write_remote` found: lazy pages served from the copy, and from the source
    (of which ``changed`` the copy holds in an older version)."""

    local: int
    remote: int
    changed: int


@dataclass(frozen=True, slots=True)
class Remote:
    """Per task, the lazy pages that come from the source, and those of them the copy holds
    in an older version: the runtime's memory written since the copy, what the restored
    service touches first (they go with the state, coded against the copy)."""

    pages: dict[int, list[int]]
    changed: dict[int, list[int]]
    stats: WarmStats


def _compare(
    lazy: np.ndarray, full: Pagemap, full_dir: Path, base: Pagemap, base_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Those of ``lazy`` (sorted addresses) whose page in the copy equals the frozen one, and
    those the copy holds in another version."""
    none = np.empty(0, dtype=np.int64)
    base_v = base.present_vaddrs()
    full_v = full.present_vaddrs()
    if not base_v.size or not full_v.size or not lazy.size:
        return none, none
    b_at, in_base = locate(base_v, lazy)
    f_at, in_full = locate(full_v, lazy)
    both = np.flatnonzero(in_base & in_full)
    if not both.size:
        return none, none
    base_pages = layout_pages(base_dir, base)
    full_pages = layout_pages(full_dir, full)
    equal = (base_pages[b_at[both]] == full_pages[f_at[both]]).all(axis=1)
    return (
        np.asarray(lazy[both[equal]], dtype=np.int64),
        np.asarray(lazy[both[~equal]], dtype=np.int64),
    )


def write_remote(lazy_dir: Path, full_dir: Path, base_dir: Path, name: str) -> Remote:
    """Per task, the lazy pages of ``lazy_dir`` that must come from the source: all but those
    the copy ``base_dir`` holds equal to the frozen image ``full_dir``. Written as
    ``lazy_dir / name`` (JSON, task -> addresses), and returned with the changed ones."""
    full_maps = layout_pagemaps(full_dir)
    base_maps = layout_pagemaps(base_dir)
    remote: dict[int, list[int]] = {}
    changed: dict[int, list[int]] = {}
    local_total = 0
    for task, vaddrs in lazy_vaddrs(lazy_dir).items():
        lazy = np.unique(np.asarray(vaddrs, dtype=np.int64))
        full, base = full_maps.get(str(task)), base_maps.get(str(task))
        local, other = (
            _compare(lazy, full, full_dir, base, base_dir)
            if full is not None and base is not None
            else (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
        )
        remote[task] = np.setdiff1d(lazy, local, assume_unique=True).tolist()
        changed[task] = other.tolist()
        local_total += int(local.size)
    (lazy_dir / name).write_text(json.dumps({str(t): v for t, v in remote.items()}))
    stats = WarmStats(
        local=local_total,
        remote=sum(len(v) for v in remote.values()),
        changed=sum(len(v) for v in changed.values()),
    )
    return Remote(remote, changed, stats)


def working_set(
    written: Mapping[int, Sequence[int]],
    changed: Mapping[int, Sequence[int]],
    limit: int,
    *,
    cap: int = 1024,
) -> dict[int, list[int]]:
    """The pages to send with the state: every page changed since the copy (at most ``cap``:
    coded against the copy they cost a few bytes each; they are the runtime's memory written
    since, what the restored service touches first), and of the others seen written before
    the freeze (sent whole, compressed) at most ``limit``."""
    out: dict[int, list[int]] = {}
    left_changed, left_written = max(0, cap), max(0, limit)
    for task in sorted(set(written) | set(changed)):
        take = list(changed.get(task, ()))[:left_changed]
        left_changed -= len(take)
        known = set(take)
        extra = [v for v in written.get(task, ()) if v not in known][:left_written]
        left_written -= len(extra)
        if take or extra:
            out[task] = [*extra, *take]
    return out


def fill_from_base(images: Path, base_dir: Path, remote: Mapping[int, Collection[int]]) -> int:
    """At the destination, before the restore: every lazy page of ``images`` not listed in
    ``remote`` becomes a present page with its bytes from the copy ``base_dir``, so the
    restore maps it at once and only the remote pages fault (each fault costs a trip through
    CRIU's daemon and fogmig's page server even when the page is here: 2,000 of them kept a
    restored sensor silent for a second). Returns the pages filled."""
    base_maps = layout_pagemaps(base_dir)
    filled = 0
    for name, pm in layout_pagemaps(images).items():
        task = task_id(pm)
        if task is None or not any(e.lazy for e in pm.entries):
            continue
        far = np.asarray(sorted(remote.get(task, ())), dtype=np.int64)
        base = base_maps.get(name)
        base_v = base.present_vaddrs() if base is not None else np.empty(0, dtype=np.int64)
        cur = layout_pages(images, pm)
        base_pages = layout_pages(base_dir, base) if base is not None else cur[:0]
        entries: list[PagemapEntry] = []
        chunks: list[npt.NDArray[np.uint8]] = []
        row = 0
        for e in pm.entries:
            if e.present:
                chunks.append(cur[row : row + e.nr_pages])
                row += e.nr_pages
                entries.append(e)
                continue
            if not e.lazy:
                entries.append(e)
                continue
            vaddrs = e.vaddr + np.arange(e.nr_pages, dtype=np.int64) * PAGE_SIZE
            for first, n, is_far_run in flag_runs(locate(far, vaddrs)[1]):
                run = vaddrs[first : first + n]
                if is_far_run:
                    entries.append(PagemapEntry(int(run[0]), n, e.flags))
                    continue
                at, found = locate(base_v, run)
                if not found.all():
                    raise LazyLayoutError(
                        f"{images / pm.file_name}: a page at {int(run[0]):#x} is neither "
                        f"remote nor in the copy {base_dir}"
                    )
                chunks.append(base_pages[at])
                entries.append(PagemapEntry(int(run[0]), n, (e.flags & ~PE_LAZY) | PE_PRESENT))
                filled += n
        data = b"".join(c.tobytes() for c in chunks)
        del cur, base_pages  # the memory maps of files about to be replaced
        pages_id = pm.pages_id
        if pages_id is None:
            raise LazyLayoutError(f"{images / pm.file_name} lists lazy pages but no pages file")
        tmp = images / f".pages-{pages_id}.img.fill"
        tmp.write_bytes(data)
        tmp.replace(images / f"pages-{pages_id}.img")
        write_pagemap(images, Pagemap(pm.image_id, pages_id, tuple(entries)))
    return filled
