"""The delta directory: what crosses the link for one pre-copy round, and its checks.

Delta directory layout (format version 2):

- ``delta.json``: the manifest (:class:`DeltaManifest`).
- every non-page file of the dump as it is, pagemaps included (``descriptors.json``,
  ``cgroup.img``, ``core-*.img``, ...).
- ``delta-pages-<image id>.img`` per pagemap: the shipped pages as runs with their bytes.

A runs file is ``b"FMPDRUN1"``, u32 flags (bit 0: page bytes follow), u32 run count, u64 page
count, then per run u64 vaddr and u64 page count, then the pages, all little-endian.
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
from fogmig.platform.runtime.pagemap import Vaddrs

MANIFEST_NAME = "delta.json"
DELTA_FORMAT_VERSION = 2
DELTA_PAGES_PREFIX = "delta-pages-"

RUNS_MAGIC = b"FMPDRUN1"
_RUNS_HEAD = struct.Struct("<8sIIQ")
_RUNS_WITH_DATA = 1
_RUN_DTYPE = np.dtype([("vaddr", "<i8"), ("nr_pages", "<i8")])

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


def write_runs(
    path: Path, vaddrs: Vaddrs, pages: npt.NDArray[np.uint8], index: npt.NDArray[np.int64]
) -> None:
    """Write a runs file of ``vaddrs`` followed by the bytes of ``pages[index]``, in order."""
    runs = runs_of(vaddrs)
    with path.open("wb") as f:
        f.write(_RUNS_HEAD.pack(RUNS_MAGIC, _RUNS_WITH_DATA, runs.size, int(vaddrs.size)))
        f.write(runs.tobytes())
        for s in range(0, index.size, CHUNK_PAGES):
            f.write(np.ascontiguousarray(pages[index[s : s + CHUNK_PAGES]]).tobytes())


@dataclass(frozen=True, slots=True)
class PageRuns:
    """A runs file read back: page vaddrs (ascending) and, if it carries them, their bytes."""

    vaddrs: Vaddrs
    pages: npt.NDArray[np.uint8] | None


def read_runs(path: Path) -> PageRuns:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_RUNS_HEAD.size)
            if len(head) != _RUNS_HEAD.size:
                raise DeltaError(f"{path}: truncated header")
            magic, flags, nr_runs, nr_pages = _RUNS_HEAD.unpack(head)
            if magic != RUNS_MAGIC:
                raise DeltaError(f"{path}: not a page runs file")
            table = f.read(nr_runs * _RUN_DTYPE.itemsize)
    except OSError as exc:
        raise DeltaError(f"cannot read {path}: {exc}") from exc
    if len(table) != nr_runs * _RUN_DTYPE.itemsize:
        raise DeltaError(f"{path}: truncated run table")
    runs = np.frombuffer(table, dtype=_RUN_DTYPE)
    if runs.size and (np.any(runs["nr_pages"] <= 0) or np.any(runs["vaddr"] % PAGE_SIZE)):
        raise DeltaError(f"{path}: bad run in the run table")
    vaddrs = _expand_runs(runs)
    if vaddrs.size != nr_pages or (vaddrs.size > 1 and np.any(np.diff(vaddrs) <= 0)):
        raise DeltaError(f"{path}: run table disagrees with its page count or is unordered")
    data_off = _RUNS_HEAD.size + table.__len__()
    with_data = bool(flags & _RUNS_WITH_DATA)
    expected = data_off + (nr_pages * PAGE_SIZE if with_data else 0)
    if size != expected:
        raise DeltaError(f"{path}: {size} bytes, expected {expected}")
    pages: npt.NDArray[np.uint8] | None = None
    if with_data:
        pages = (
            np.memmap(path, dtype=np.uint8, mode="r", offset=data_off, shape=(nr_pages, PAGE_SIZE))
            if nr_pages
            else np.empty((0, PAGE_SIZE), dtype=np.uint8)
        )
    return PageRuns(vaddrs, pages)


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
    version: Literal[2] = 2
    files: list[str]
    pagemaps: list[PagemapRecord]
    pages_total: int
    pages_changed: int
    pages_new: int
    pages_gone: int
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
