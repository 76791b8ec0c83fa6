"""The delta directory: what crosses the link for one pre-copy round, and its checks.

Delta directory layout (format version 3):

- ``delta.json``: the manifest (:class:`DeltaManifest`).
- every non-page file of the dump as it is, pagemaps included (``descriptors.json``,
  ``cgroup.img``, ``core-*.img``, ...).
- ``delta-pages-<image id>.img`` per pagemap: the shipped pages as runs with their bytes.

A runs file is ``b"FMPDRUN2"``, u32 flags (bit 0: page bytes follow), u32 run count, u64 page
count, then per run u64 vaddr and u64 page count; with page bytes a u8 kind per page (raw, or
XOR with the base round's page at the same vaddr) and the page section of ``pagecodec`` (a u32
block count, then per block u32 pages, u8 codec, u32 length and the bytes), all little-endian.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.delta.pagecodec import (
    BLOCK_PAGES,
    PageCodecError,
    SectionWriter,
    block_count_bytes,
    check_kinds,
    choose_kinds,
    coded,
    read_section,
)
from fogmig.platform.runtime.pagemap import Vaddrs

MANIFEST_NAME = "delta.json"
DELTA_FORMAT_VERSION = 3
DELTA_PAGES_PREFIX = "delta-pages-"

RUNS_MAGIC = b"FMPDRUN2"
_RUNS_HEAD = struct.Struct("<8sIIQ")
_RUNS_WITH_DATA = 1
_RUN_DTYPE = np.dtype([("vaddr", "<i8"), ("nr_pages", "<i8")])
_MAX_PAGES = 1 << 28

# Pages compared, written or hashed per step: bounds the temporary copies to 2 x 16 MiB
# whatever the state size.
CHUNK_PAGES = 4096

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")


class DeltaError(FogmigError):
    """A page delta cannot be computed, read or applied (wrong base, missing page, bad file)."""


def gather(pages: npt.NDArray[np.uint8], idx: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """``pages[idx]``, as a slice when ``idx`` is a run (the common case): no gather copy."""
    n = idx.size
    if n and idx[-1] - idx[0] == n - 1 and (n < 3 or np.all(np.diff(idx) == 1)):
        return np.asarray(pages[idx[0] : idx[0] + n])
    return pages[idx]


def prepare_out(out_dir: Path) -> None:
    """Create ``out_dir`` for a delta or a rebuild; it must not hold anything yet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise DeltaError(f"{out_dir} is not empty; a delta or rebuild needs a fresh directory")


# ---------------------------------------------------------------- runs files


def runs_of(vaddrs: Vaddrs) -> npt.NDArray[np.void]:
    """Group ascending page vaddrs into ``(vaddr, nr_pages)`` runs of consecutive pages."""
    v = np.asarray(vaddrs, dtype=np.int64)
    runs = np.zeros(0, dtype=_RUN_DTYPE)
    if v.size == 0:
        return runs
    breaks = np.flatnonzero(np.diff(v) != PAGE_SIZE) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [v.size]))
    runs = np.zeros(starts.size, dtype=_RUN_DTYPE)
    runs["vaddr"] = v[starts]
    runs["nr_pages"] = ends - starts
    return runs


def _expand_runs(runs: npt.NDArray[np.void]) -> Vaddrs:
    if runs.size == 0:
        return np.empty(0, dtype=np.int64)
    counts = runs["nr_pages"].astype(np.int64)
    starts = np.repeat(runs["vaddr"].astype(np.int64), counts)
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(counts) - counts, counts
    )
    return starts + offsets * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class WrittenRuns:
    """What a runs file holds: pages by kind, and the page bytes before and after coding."""

    pages_xor: int
    pages_raw: int
    plain_bytes: int
    stored_bytes: int


def write_runs(
    path: Path,
    vaddrs: Vaddrs,
    pages: npt.NDArray[np.uint8],
    index: npt.NDArray[np.int64],
    *,
    base_pages: npt.NDArray[np.uint8] | None = None,
    base_index: npt.NDArray[np.int64] | None = None,
) -> WrittenRuns:
    """Write a runs file of ``vaddrs`` and the pages ``pages[index]``, in order.

    Where ``base_index`` names the page the destination already holds (``base_pages`` row, -1:
    none) a page may travel as its XOR with that page (``pagecodec``).
    """
    runs = runs_of(vaddrs)
    n = int(index.size)
    kinds = np.zeros(n, dtype=np.uint8)
    with path.open("wb") as f:
        f.write(_RUNS_HEAD.pack(RUNS_MAGIC, _RUNS_WITH_DATA, runs.size, int(vaddrs.size)))
        f.write(runs.tobytes())
        # The kinds are known only once the pages are coded: their place is kept, then filled.
        kinds_at = f.tell()
        f.write(bytes(n))
        f.write(block_count_bytes(-(-n // BLOCK_PAGES)))
        section = SectionWriter(f)
        for s in range(0, n, CHUNK_PAGES):
            e = min(s + CHUNK_PAGES, n)
            cur = np.ascontiguousarray(pages[index[s:e]])
            base = np.zeros_like(cur)
            has_base = np.zeros(e - s, dtype=np.bool_)
            if base_pages is not None and base_index is not None:
                bi = base_index[s:e]
                has_base = bi >= 0
                base[has_base] = base_pages[bi[has_base]]
            kinds[s:e] = choose_kinds(cur, base, has_base)
            section.write_blocks(coded(cur, base, kinds[s:e]))
        f.seek(kinds_at)
        f.write(kinds.tobytes())
    xor = int(np.count_nonzero(kinds))
    return WrittenRuns(xor, n - xor, section.plain_bytes, section.stored_bytes)


@dataclass(frozen=True, slots=True)
class PageRuns:
    """A runs file read back: page vaddrs (ascending) and, if it carries them, the decoded
    page section (each page raw or XOR with its base, as ``kinds`` says)."""

    vaddrs: Vaddrs
    pages: npt.NDArray[np.uint8] | None
    kinds: npt.NDArray[np.uint8] | None = None


def read_runs(path: Path) -> PageRuns:
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise DeltaError(f"cannot read {path}: {exc}") from exc
    if len(data) < _RUNS_HEAD.size:
        raise DeltaError(f"{path}: truncated header")
    magic, flags, nr_runs, nr_pages = _RUNS_HEAD.unpack_from(data, 0)
    if magic != RUNS_MAGIC:
        raise DeltaError(f"{path}: not a page runs file")
    table_end = _RUNS_HEAD.size + nr_runs * _RUN_DTYPE.itemsize
    if len(data) < table_end:
        raise DeltaError(f"{path}: truncated run table")
    runs = np.frombuffer(data[_RUNS_HEAD.size : table_end], dtype=_RUN_DTYPE)
    if runs.size and (np.any(runs["nr_pages"] <= 0) or np.any(runs["vaddr"] % PAGE_SIZE)):
        raise DeltaError(f"{path}: bad run in the run table")
    # Checked before anything is expanded: each page with data costs at least its kind byte.
    limit = len(data) - table_end if flags & _RUNS_WITH_DATA else _MAX_PAGES
    if nr_pages > limit or int(runs["nr_pages"].sum()) != nr_pages:
        raise DeltaError(f"{path}: {nr_pages} pages cannot fit in {len(data)} bytes")
    vaddrs = _expand_runs(runs)
    if vaddrs.size != nr_pages or (vaddrs.size > 1 and np.any(np.diff(vaddrs) <= 0)):
        raise DeltaError(f"{path}: run table disagrees with its page count or is unordered")
    if not flags & _RUNS_WITH_DATA:
        if len(data) != table_end:
            raise DeltaError(f"{path}: {len(data)} bytes, expected {table_end}")
        return PageRuns(vaddrs, None)
    if len(data) < table_end + nr_pages:
        raise DeltaError(f"{path}: truncated page kinds, expected more bytes")
    kinds = np.frombuffer(data[table_end : table_end + nr_pages], dtype=np.uint8)
    try:
        check_kinds(kinds)
        pages = read_section(data[table_end + nr_pages :], int(nr_pages))
    except PageCodecError as exc:
        raise DeltaError(f"{path}: {exc}") from exc
    return PageRuns(vaddrs, pages, kinds)


# ---------------------------------------------------------------- manifest


class PagemapRecord(BaseModel):
    """One pagemap of the delta: where its pieces are and how to check the rebuild."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_id: str
    pagemap: str
    pages: str | None
    present_pages: int
    shipped_pages: int
    delta_pages: str
    base_pagemap_sha256: str | None
    pages_sha256: str | None

    @field_validator("pagemap", "pages", "delta_pages")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        return check_name(v) if v is not None else None


class DeltaManifest(BaseModel):
    """``delta.json``: what the delta directory holds; names are checked to be plain names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fogmig-page-delta"] = "fogmig-page-delta"
    version: Literal[3] = 3
    files: list[str]
    pagemaps: list[PagemapRecord]
    pages_total: int
    pages_changed: int
    pages_new: int
    pages_gone: int
    pages_xor: int = 0
    """Shipped pages that travel as their XOR with the base's page (the rest raw)."""
    page_bytes_plain: int = 0
    """The shipped pages' 4 KiB each ..."""
    page_bytes_stored: int = 0
    """... and what their page sections take after XOR and compression."""
    compare_seconds: float

    @field_validator("files")
    @classmethod
    def _plain_names(cls, v: list[str]) -> list[str]:
        return [check_name(n) for n in v]


def check_name(name: str) -> str:
    # Names come from another node: never let one climb out of the directory.
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


def read_manifest(delta_dir: Path) -> DeltaManifest:
    path = delta_dir / MANIFEST_NAME
    try:
        return DeltaManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise DeltaError(f"{delta_dir} has no {MANIFEST_NAME}: not a page delta") from exc
    except ValidationError as exc:
        raise DeltaError(f"{path} is not a valid delta manifest: {exc}") from exc
