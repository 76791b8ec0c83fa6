"""The lazy layout: the image set of a lazy dump, derived from a complete local dump.

The destination restores from it with ``criu restore --lazy-pages``; every page left out is
faulted in later through fogmig's page server. ``full_dir`` stays the source's safe copy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import LazyLayoutError
from fogmig.platform.migration.lazy.protocol import PE_LAZY, PE_PARENT, PE_PRESENT
from fogmig.platform.runtime.image import ImageFormatError
from fogmig.platform.runtime.pagemap import (
    Pagemap,
    PagemapEntry,
    is_pages_file,
    load_pages,
    read_pagemaps,
    write_pagemap,
)

log = logging.getLogger(__name__)


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


def layout_pagemaps(directory: Path) -> dict[str, Pagemap]:
    """The pagemaps of an image set, a damaged one a :class:`LazyLayoutError`."""
    try:
        return read_pagemaps(directory)
    except ImageFormatError as exc:
        raise LazyLayoutError(f"{directory}: {exc}") from exc


def layout_pages(directory: Path, pagemap: Pagemap) -> npt.NDArray[np.uint8]:
    """The pages of ``pagemap`` in ``directory`` (memory-mapped), a short file a
    :class:`LazyLayoutError`."""
    try:
        return load_pages(directory, pagemap)
    except ImageFormatError as exc:
        raise LazyLayoutError(str(exc)) from exc


def task_id(pagemap: Pagemap) -> int | None:
    """The pid of a process pagemap; None for shared memory (``shmem-<id>``)."""
    return int(pagemap.image_id) if pagemap.image_id.isdigit() else None


def lazy_vaddrs(image_dir: Path) -> dict[int, list[int]]:
    """Per task, the address of every page the daemon must fault in (entries flagged LAZY)."""
    out: dict[int, list[int]] = {}
    for pagemap in read_pagemaps(image_dir).values():
        task = task_id(pagemap)
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
    pagemaps = layout_pagemaps(full_dir)
    if not pagemaps:
        raise LazyLayoutError(f"{full_dir} holds no pagemap: not a CRIU dump")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise LazyLayoutError(f"{out_dir} is not empty")

    converted_pages: set[str] = set()
    by_task: dict[int, int] = {}
    kept_total = lazy_total = 0
    for pagemap in pagemaps.values():
        task = task_id(pagemap)
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
