"""A lazy layout's kept pages as a delta against pages the destination already holds.

A lazy layout keeps the pages CRIU never makes lazy (stacks, written pages of file mappings):
about 2 MB of the sensor service, sent while the service is frozen. The destination already
holds a copy where almost all of them are unchanged: for hybrid the last round's complete
image, for post-copy a live copy of those pages sent ahead of the freeze (:func:`write_base`
from ``runtime/snapshot``). So each kept pages file travels as ``<pages file>.fmkd``: every
page as its XOR with the page at the same address in that copy (or raw where there is none,
or the XOR is no sparser), compressed in blocks (``migration/delta/pagecodec``). The
destination rebuilds the pages file byte for byte before the restore.

A ``.fmkd`` file is ``b"FMKEPT01"``, u64 page count, one kind byte per page, then the page
section (block count and blocks), all little-endian.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.delta.pagecodec import (
    KIND_XOR,
    PageCodecError,
    SectionWriter,
    block_count_bytes,
    check_kinds,
    choose_kinds,
    coded,
    read_section,
)
from fogmig.platform.migration.lazy.errors import LazyLayoutError
from fogmig.platform.migration.lazy.layout import layout_pagemaps, layout_pages
from fogmig.platform.runtime.pagemap import (
    MAX_ENTRY_PAGES,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    locate,
    write_pagemap,
)
from fogmig.platform.runtime.snapshot import TaskPages

SUFFIX = ".fmkd"
_MAGIC = b"FMKEPT01"
_HEAD = struct.Struct("<8sQ")


@dataclass(frozen=True, slots=True)
class KeptDeltaStats:
    """What :func:`encode_kept` did: bytes of the kept pages before and after."""

    files: int
    pages: int
    xor_pages: int
    plain_bytes: int
    coded_bytes: int


def _base_rows(
    base: Pagemap | None, base_dir: Path, vaddrs: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """For each of ``vaddrs``: the base's page at that address (zeros if none), and whether
    there was one."""
    pages = np.zeros((vaddrs.size, PAGE_SIZE), dtype=np.uint8)
    found = np.zeros(vaddrs.size, dtype=np.bool_)
    if base is None or base.pages_file_name is None or vaddrs.size == 0:
        return pages, found
    base_v = base.present_vaddrs()
    if base_v.size == 0:
        return pages, found
    base_pages = layout_pages(base_dir, base)
    at, found = locate(base_v, vaddrs)
    rows = np.flatnonzero(found)
    if rows.size:
        pages[rows] = base_pages[at[rows]]
    return pages, found


def _runs(vaddrs: Sequence[int]) -> list[PagemapEntry]:
    """Consecutive addresses as pagemap entries of present pages."""
    entries: list[PagemapEntry] = []
    for vaddr in vaddrs:
        last = entries[-1] if entries else None
        if last is not None and last.end == vaddr and last.nr_pages < MAX_ENTRY_PAGES:
            entries[-1] = PagemapEntry(last.vaddr, last.nr_pages + 1, PE_PRESENT)
        else:
            entries.append(PagemapEntry(vaddr, 1, PE_PRESENT))
    return entries


def write_base(out_dir: Path, snapshot: Mapping[int, TaskPages]) -> int:
    """Write a live copy of kept pages as an image set :func:`encode_kept` can code against
    (one pagemap and pages file per task, named as a dump names them); the pages written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for pages_id, (task, pages) in enumerate(sorted(snapshot.items()), start=1):
        if not len(pages):
            continue
        (out_dir / f"pages-{pages_id}.img").write_bytes(pages.data)
        write_pagemap(out_dir, Pagemap(str(task), pages_id, tuple(_runs(pages.vaddrs))))
        written += len(pages)
    return written


def encode_kept(lazy_dir: Path, base_dir: Path) -> KeptDeltaStats:
    """Replace every kept pages file of ``lazy_dir`` by its delta against ``base_dir``."""
    files = pages_total = xor_total = plain = stored = 0
    base_maps = layout_pagemaps(base_dir)
    for name, pm in layout_pagemaps(lazy_dir).items():
        if pm.pages_file_name is None or pm.present_pages == 0:
            continue
        cur = layout_pages(lazy_dir, pm)
        vaddrs = pm.present_vaddrs()
        base, has_base = _base_rows(base_maps.get(name), base_dir, vaddrs)
        kinds = choose_kinds(cur, base, has_base)
        out = io.BytesIO()
        out.write(_HEAD.pack(_MAGIC, vaddrs.size))
        out.write(kinds.tobytes())
        section = io.BytesIO()
        writer = SectionWriter(section)
        blocks = writer.write_blocks(coded(cur, base, kinds))
        out.write(block_count_bytes(blocks))
        out.write(section.getvalue())
        path = lazy_dir / pm.pages_file_name
        (lazy_dir / (pm.pages_file_name + SUFFIX)).write_bytes(out.getvalue())
        del cur  # the memory map of the file about to go
        path.unlink()
        files += 1
        pages_total += int(vaddrs.size)
        xor_total += int(np.count_nonzero(kinds == KIND_XOR))
        plain += int(vaddrs.size) * PAGE_SIZE
        stored += out.tell()
    return KeptDeltaStats(files, pages_total, xor_total, plain, stored)


def decode_kept(lazy_dir: Path, base_dir: Path) -> int:
    """Rebuild every kept pages file of ``lazy_dir`` from its delta and ``base_dir``; the
    number of files rebuilt (0 for a layout sent as it is)."""
    base_maps = layout_pagemaps(base_dir)
    rebuilt = 0
    for name, pm in layout_pagemaps(lazy_dir).items():
        if pm.pages_file_name is None:
            continue
        coded_path = lazy_dir / (pm.pages_file_name + SUFFIX)
        if not coded_path.exists():
            continue
        data = memoryview(coded_path.read_bytes())
        try:
            pages = _decode(data, pm, base_maps.get(name), base_dir)
        except PageCodecError as exc:
            raise LazyLayoutError(f"{coded_path}: {exc}") from exc
        (lazy_dir / pm.pages_file_name).write_bytes(pages.tobytes())
        coded_path.unlink()
        rebuilt += 1
    leftover = sorted(p.name for p in lazy_dir.glob(f"*{SUFFIX}"))
    if leftover:
        raise LazyLayoutError(f"{lazy_dir}: {leftover} belong to no pagemap")
    return rebuilt


def _decode(
    data: memoryview, pm: Pagemap, base: Pagemap | None, base_dir: Path
) -> npt.NDArray[np.uint8]:
    if len(data) < _HEAD.size:
        raise PageCodecError("truncated header")
    magic, count = _HEAD.unpack_from(data, 0)
    if magic != _MAGIC:
        raise PageCodecError("not a kept-pages delta")
    vaddrs = pm.present_vaddrs()
    if count != vaddrs.size:
        raise PageCodecError(f"{count} pages, the pagemap lists {vaddrs.size}")
    pos = _HEAD.size
    if len(data) < pos + count:
        raise PageCodecError("truncated page kinds")
    kinds = np.frombuffer(data[pos : pos + count], dtype=np.uint8)
    check_kinds(kinds)
    pages = read_section(data[pos + count :], count)
    xor = np.flatnonzero(kinds == KIND_XOR)
    if xor.size:
        base_pages, found = _base_rows(base, base_dir, vaddrs[xor])
        if not found.all():
            raise PageCodecError(
                f"page {int(vaddrs[xor][~found][0]):#x} is coded against a base page that "
                f"{base_dir} does not have"
            )
        pages[xor] ^= base_pages
    return pages
