"""CRIU's ``pagemap-<id>.img`` files: which virtual pages a dump holds and where their bytes are.

Each pagemap names its ``pages-<pages_id>.img`` in a head record; the bytes of its PRESENT pages
sit there in entry order, 4 KiB each. The page delta keys every page by (pagemap, vaddr).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.runtime.image import (
    IMG_COMMON_MAGIC,
    PAGEMAP_MAGIC,
    ImageFormatError,
    decode_message,
    encode_message,
    parse_image,
    write_image,
)

PAGEMAP_MAGICS = (IMG_COMMON_MAGIC, PAGEMAP_MAGIC)

# criu/include/pagemap.h
PE_PARENT = 1  # the page is in the parent image set (the ``parent`` link of the image dir)
PE_LAZY = 2  # the page may be restored on demand by the lazy-pages daemon
PE_PRESENT = 4  # the page's bytes are in this dump's pages file

# CRIU's dump never writes longer entries; keeping to it keeps rewritten pagemaps familiar.
MAX_ENTRY_PAGES = 1024

_PREFIX = "pagemap-"
_SUFFIX = ".img"

# Field numbers of criu/images/pagemap.proto.
_HEAD_PAGES_ID = 1
_PE_VADDR = 1
_PE_COMPAT_NR_PAGES = 2
_PE_IN_PARENT = 3
_PE_FLAGS = 4
_PE_NR_PAGES = 5

Vaddrs = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """A run of ``nr_pages`` consecutive pages starting at ``vaddr`` that share ``flags``."""

    vaddr: int
    nr_pages: int
    flags: int

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)

    @property
    def in_parent(self) -> bool:
        return bool(self.flags & PE_PARENT)


@dataclass(frozen=True, slots=True)
class Pagemap:
    """One pagemap file of a dump.

    ``image_id`` is what follows ``pagemap-`` in the file name: a pid for a process
    (``pagemap-1.img`` under runc) or ``shmem-<id>`` for a shared memory segment, whose
    "vaddr" is an offset inside the segment. ``pages_id`` is ``None`` for an empty pagemap
    (CRIU writes only the magics for a task without private memory).
    """

    image_id: str
    pages_id: int | None
    entries: tuple[PagemapEntry, ...]

    @property
    def file_name(self) -> str:
        return f"{_PREFIX}{self.image_id}{_SUFFIX}"

    @property
    def pages_file_name(self) -> str | None:
        return None if self.pages_id is None else f"pages-{self.pages_id}.img"

    @property
    def present_pages(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.present)

    @property
    def pages_size(self) -> int:
        """Size in bytes that the pages file must have."""
        return self.present_pages * PAGE_SIZE

    def present_vaddrs(self) -> Vaddrs:
        """The vaddr of every page in the pages file, in file order (index i = page i)."""
        return _expand([e for e in self.entries if e.present])

    def page_offsets(self) -> dict[int, int]:
        """Map each PRESENT page's vaddr to its byte offset in the pages file."""
        return {int(v): i * PAGE_SIZE for i, v in enumerate(self.present_vaddrs())}

    def vaddrs_with(self, flags: int) -> Vaddrs:
        """The vaddr of every page whose entry has all of ``flags`` set, in entry order."""
        return _expand([e for e in self.entries if e.flags & flags == flags])

    def all_vaddrs(self) -> Vaddrs:
        return _expand(list(self.entries))


def _expand(entries: list[PagemapEntry]) -> Vaddrs:
    if not entries:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(
        [np.arange(e.vaddr, e.end, PAGE_SIZE, dtype=np.int64) for e in entries if e.nr_pages > 0]
        or [np.empty(0, dtype=np.int64)]
    )


def image_id_of(path: Path) -> str:
    """``pagemap-shmem-5.img`` -> ``shmem-5``; raises for a name that is not a pagemap."""
    name = path.name
    if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)) or len(name) <= len(_PREFIX) + len(
        _SUFFIX
    ):
        raise ImageFormatError(f"{name} is not named like a CRIU pagemap image")
    return name[len(_PREFIX) : -len(_SUFFIX)]


def _int_field(fields: dict[int, list[int | bytes]], number: int) -> int | None:
    values = fields.get(number)
    if not values:
        return None
    value = values[-1]
    if not isinstance(value, int):
        raise ImageFormatError(f"pagemap field {number} is not a varint")
    return value


def decode_pagemap(data: bytes, image_id: str) -> Pagemap:
    """Decode a pagemap image; old-style entries are read as CRIU reads them."""
    img = parse_image(data)
    if img.magics != PAGEMAP_MAGICS:
        raise ImageFormatError(
            f"pagemap-{image_id}: magics {img.magics[0]:#x} {img.magics[1]:#x} are not a pagemap's"
        )
    if not img.records:
        return Pagemap(image_id, None, ())
    pages_id = _int_field(decode_message(img.records[0]), _HEAD_PAGES_ID)
    if pages_id is None:
        raise ImageFormatError(f"pagemap-{image_id}: head record has no pages_id")
    entries: list[PagemapEntry] = []
    for rec in img.records[1:]:
        fields = decode_message(rec)
        vaddr = _int_field(fields, _PE_VADDR)
        if vaddr is None:
            raise ImageFormatError(f"pagemap-{image_id}: entry without vaddr")
        nr_pages = _int_field(fields, _PE_NR_PAGES)
        if nr_pages is None:
            nr_pages = _int_field(fields, _PE_COMPAT_NR_PAGES) or 0
        flags = _int_field(fields, _PE_FLAGS)
        # Same reading as criu/pagemap.c init_compat_pagemap_entry().
        if _int_field(fields, _PE_IN_PARENT):
            flags = (flags or 0) | PE_PARENT
        elif flags is None:
            flags = PE_PRESENT
        if vaddr % PAGE_SIZE:
            raise ImageFormatError(f"pagemap-{image_id}: vaddr {vaddr:#x} is not page aligned")
        entries.append(PagemapEntry(vaddr, nr_pages, flags))
    return Pagemap(image_id, pages_id, tuple(entries))


def encode_pagemap(pagemap: Pagemap) -> bytes:
    """Encode as CRIU 4.x writes it: fields vaddr, compat_nr_pages=0, flags, nr_pages."""
    if pagemap.pages_id is None:
        if pagemap.entries:
            raise ImageFormatError(f"{pagemap.file_name}: entries without a pages_id")
        return write_image(PAGEMAP_MAGICS, [])
    records = [encode_message([(_HEAD_PAGES_ID, pagemap.pages_id)])]
    records.extend(
        encode_message(
            [
                (_PE_VADDR, e.vaddr),
                (_PE_COMPAT_NR_PAGES, 0),
                (_PE_FLAGS, e.flags),
                (_PE_NR_PAGES, e.nr_pages),
            ]
        )
        for e in pagemap.entries
    )
    return write_image(PAGEMAP_MAGICS, records)


def read_pagemap(path: Path) -> Pagemap:
    return decode_pagemap(path.read_bytes(), image_id_of(path))


def write_pagemap(directory: Path, pagemap: Pagemap) -> Path:
    path = directory / pagemap.file_name
    path.write_bytes(encode_pagemap(pagemap))
    return path


def pagemap_paths(directory: Path) -> list[Path]:
    """Every pagemap image of a dump directory (process and shared-memory ones), sorted."""
    return sorted(p for p in directory.glob(f"{_PREFIX}*{_SUFFIX}") if p.is_file())


def read_pagemaps(directory: Path) -> dict[str, Pagemap]:
    """All pagemaps of a dump directory keyed by image id; raises if two share a pages file."""
    pagemaps = {image_id_of(p): read_pagemap(p) for p in pagemap_paths(directory)}
    owners: dict[int, str] = {}
    for pm in pagemaps.values():
        if pm.pages_id is None:
            continue
        other = owners.setdefault(pm.pages_id, pm.image_id)
        if other != pm.image_id:
            raise ImageFormatError(
                f"{directory}: pagemap-{other} and pagemap-{pm.image_id} "
                f"both name pages-{pm.pages_id}.img"
            )
    return pagemaps


def is_pages_file(name: str) -> bool:
    """``pages-<n>.img``: raw page contents, the only files a delta does not copy as they are."""
    return name.startswith("pages-") and name.endswith(_SUFFIX) and name[6:-4].isdigit()


def locate(vaddrs: Vaddrs, wanted: Vaddrs) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """For each of ``wanted``: its row in ``vaddrs`` (in any order), and whether it is there
    (where it is not, the row is meaningless)."""
    if vaddrs.size == 0:
        return np.zeros(wanted.size, dtype=np.int64), np.zeros(wanted.size, dtype=np.bool_)
    order = np.argsort(vaddrs, kind="stable")
    pos = np.minimum(np.searchsorted(vaddrs[order], wanted), vaddrs.size - 1)
    return order[pos].astype(np.int64), vaddrs[order][pos] == wanted


def flag_runs(flags: npt.NDArray[np.bool_]) -> list[tuple[int, int, bool]]:
    """``(first index, length, flag)`` of each run of equal values, in order."""
    if not flags.size:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [flags.size]))
    return [(int(a), int(b - a), bool(flags[a])) for a, b in zip(starts, ends, strict=True)]


def load_pages(directory: Path, pagemap: Pagemap) -> npt.NDArray[np.uint8]:
    """The pages file as a read-only ``(present_pages, PAGE_SIZE)`` array (memory-mapped).

    Raises when the file's size disagrees with the pagemap: a truncated or mismatched dump.
    """
    name = pagemap.pages_file_name
    if name is None or pagemap.present_pages == 0:
        return np.empty((0, PAGE_SIZE), dtype=np.uint8)
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ImageFormatError(f"{path} is missing ({pagemap.file_name} names it)") from exc
    if size != pagemap.pages_size:
        raise ImageFormatError(
            f"{path} holds {size} bytes but {pagemap.file_name} lists "
            f"{pagemap.present_pages} present pages ({pagemap.pages_size} bytes)"
        )
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(pagemap.present_pages, PAGE_SIZE))


def entries_from_pages(
    vaddrs: Vaddrs, flags: Iterable[int] | npt.NDArray[np.int64]
) -> list[PagemapEntry]:
    """Group pages (ascending vaddrs, one flags value each) into pagemap entries.

    A new entry starts where the addresses stop being consecutive, the flags change, or the
    entry reaches :data:`MAX_ENTRY_PAGES`.
    """
    v = np.asarray(vaddrs, dtype=np.int64)
    f = np.asarray(list(flags) if not isinstance(flags, np.ndarray) else flags, dtype=np.int64)
    if v.shape != f.shape:
        raise ValueError("one flags value per page is needed")
    if v.size == 0:
        return []
    if np.any(np.diff(v) <= 0):
        raise ValueError("page vaddrs must be strictly ascending")
    breaks = np.flatnonzero((np.diff(v) != PAGE_SIZE) | (np.diff(f) != 0)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [v.size]))
    out: list[PagemapEntry] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        for chunk in range(s, e, MAX_ENTRY_PAGES):
            n = min(MAX_ENTRY_PAGES, e - chunk)
            out.append(PagemapEntry(int(v[chunk]), n, int(f[chunk])))
    return out
