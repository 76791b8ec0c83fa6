"""Pre-copy without soft-dirty tracking: ship only the pages whose content changed.

Each round is a full dump; :func:`compute_delta` compares it page by page (keyed by pagemap and
vaddr) with the previous round, :func:`save_delta` lays out what must cross the link as a
directory (:func:`write_delta` does both), and :func:`apply_delta` rebuilds the complete image
set at the destination.

Delta directory layout (format version 2):

- ``delta.json``: the manifest (:class:`DeltaManifest`).
- every non-page file of the dump as it is, pagemaps included (``descriptors.json``,
  ``cgroup.img``, ``core-*.img``, ...).
- ``delta-pages-<image id>.img`` per pagemap: the shipped pages as runs with their bytes.

A runs file is ``b"FMPDRUN1"``, u32 flags (bit 0: page bytes follow), u32 run count, u64 page
count, then per run u64 vaddr and u64 page count, then the pages, all little-endian.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.runtime.image import ImageFormatError
from fogmig.platform.runtime.pagemap import (
    PAGE_SIZE,
    Pagemap,
    Vaddrs,
    decode_pagemap,
    is_pages_file,
    load_pages,
    read_pagemaps,
)

__all__ = [
    "DELTA_FORMAT_VERSION",
    "MANIFEST_NAME",
    "PAGE_SIZE",
    "DeltaError",
    "DeltaManifest",
    "DeltaStats",
    "PageDelta",
    "PageRuns",
    "PagemapDelta",
    "PagemapRecord",
    "RebuildStats",
    "WrittenDelta",
    "apply_delta",
    "compute_delta",
    "read_manifest",
    "read_runs",
    "runs_of",
    "save_delta",
    "write_delta",
]

MANIFEST_NAME = "delta.json"
DELTA_FORMAT_VERSION = 2
DELTA_PAGES_PREFIX = "delta-pages-"

RUNS_MAGIC = b"FMPDRUN1"
_RUNS_HEAD = struct.Struct("<8sIIQ")
_RUNS_WITH_DATA = 1
_RUN_DTYPE = np.dtype([("vaddr", "<i8"), ("nr_pages", "<i8")])

# Pages compared per step: bounds the temporary copies to 2 x 16 MiB whatever the state size.
_COMPARE_CHUNK = 4096

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")


class DeltaError(FogmigError):
    """A page delta cannot be computed, read or applied (wrong base, missing page, bad file)."""


# ---------------------------------------------------------------- computing a delta


@dataclass(frozen=True, slots=True)
class DeltaStats:
    """What a round changed. ``pages_gone`` were in the previous dump and no longer are."""

    pages_total: int
    pages_changed: int
    pages_new: int
    pages_gone: int
    compare_seconds: float

    @property
    def pages_shipped(self) -> int:
        return self.pages_changed + self.pages_new

    @property
    def bytes_shipped(self) -> int:
        return self.pages_shipped * PAGE_SIZE

    @property
    def bytes_total(self) -> int:
        return self.pages_total * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class PagemapDelta:
    """The pages of one pagemap of the current dump that the destination does not have.

    ``shipped`` holds indices into the current pages file (ascending vaddr order).
    ``base_digest`` identifies the previous round's pagemap file (None without a previous one).
    """

    pagemap: Pagemap
    shipped: npt.NDArray[np.int64]
    pages_changed: int
    pages_new: int
    pages_gone: int
    base_digest: str | None

    def shipped_vaddrs(self) -> Vaddrs:
        return self.pagemap.present_vaddrs()[self.shipped]


@dataclass(frozen=True, slots=True)
class PageDelta:
    """The difference of the dump in ``cur_dir`` against the previous round."""

    cur_dir: Path
    pagemaps: tuple[PagemapDelta, ...]
    stats: DeltaStats


def _digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gather(pages: npt.NDArray[np.uint8], idx: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """``pages[idx]``, as a slice when ``idx`` is a run (the common case): no gather copy."""
    n = idx.size
    if n and idx[-1] - idx[0] == n - 1 and (n < 3 or np.all(np.diff(idx) == 1)):
        return np.asarray(pages[idx[0] : idx[0] + n])
    return pages[idx]


def _differing(
    cur_pages: npt.NDArray[np.uint8],
    cur_idx: npt.NDArray[np.int64],
    prev_pages: npt.NDArray[np.uint8],
    prev_idx: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """For each matched pair, whether the two 4 KiB pages differ (compared as u64 words)."""
    out = np.zeros(cur_idx.size, dtype=np.bool_)
    for s in range(0, cur_idx.size, _COMPARE_CHUNK):
        ci = cur_idx[s : s + _COMPARE_CHUNK]
        pi = prev_idx[s : s + _COMPARE_CHUNK]
        n = ci.size
        a = _gather(cur_pages, ci)
        b = _gather(prev_pages, pi)
        out[s : s + n] = (a.view(np.uint64) != b.view(np.uint64)).any(axis=1)
    return out


def _check_full_dump(pm: Pagemap, directory: Path) -> None:
    """Only complete dumps can be compared: every page's bytes must be in the image."""
    missing = [e for e in pm.entries if not e.present]
    if not missing:
        return
    e = missing[0]
    if e.in_parent:
        raise DeltaError(
            f"{directory / pm.file_name} takes pages from parent images: the page delta needs "
            "full dumps (no --prev-images-dir / pre-dump chain)"
        )
    raise DeltaError(
        f"{directory / pm.file_name} is a lazy dump: page {e.vaddr:#x} has no bytes in the "
        "image, so what changed cannot be known",
        hint="compare complete dumps: checkpoint without --lazy-pages",
    )


def _diff_pagemap(
    cur: Pagemap, cur_dir: Path, prev: Pagemap | None, prev_dir: Path | None
) -> PagemapDelta:
    _check_full_dump(cur, cur_dir)
    if prev is not None and prev_dir is not None:
        _check_full_dump(prev, prev_dir)
    cur_v = cur.present_vaddrs()
    if cur_v.size > 1 and np.any(np.diff(np.sort(cur_v)) == 0):
        raise DeltaError(f"{cur_dir / cur.file_name} lists a page twice")
    order_cur = np.argsort(cur_v, kind="stable").astype(np.int64)
    if prev is None or prev_dir is None:
        return PagemapDelta(cur, order_cur, 0, int(cur_v.size), 0, None)
    cur_pages = load_pages(cur_dir, cur)
    prev_pages = load_pages(prev_dir, prev)
    prev_v = prev.present_vaddrs()
    if prev_v.size == 0:
        matched = np.zeros(cur_v.size, dtype=np.bool_)
        prev_of_cur = np.zeros(cur_v.size, dtype=np.int64)
    else:
        order = np.argsort(prev_v, kind="stable")
        sorted_prev = prev_v[order]
        pos = np.minimum(np.searchsorted(sorted_prev, cur_v), sorted_prev.size - 1)
        matched = sorted_prev[pos] == cur_v
        prev_of_cur = order[pos].astype(np.int64)
    cur_idx = np.flatnonzero(matched).astype(np.int64)
    differs = _differing(cur_pages, cur_idx, prev_pages, prev_of_cur[cur_idx])
    ship = ~matched
    ship[cur_idx[differs]] = True
    # Ascending vaddr order, so the runs file is a sequence of address runs.
    shipped = order_cur[ship[order_cur]]
    n_matched = int(cur_idx.size)
    return PagemapDelta(
        pagemap=cur,
        shipped=shipped,
        pages_changed=int(differs.sum()),
        pages_new=int(cur_v.size - n_matched),
        pages_gone=int(prev_v.size - n_matched),
        base_digest=_digest_file(prev_dir / prev.file_name),
    )


def compute_delta(prev_dir: Path | None, cur_dir: Path) -> PageDelta:
    """Compare the dump in ``cur_dir`` with the previous round's in ``prev_dir``.

    A page is shipped when its vaddr is new or its 4 KiB differ; pages only the previous dump
    has are counted as gone. ``prev_dir=None`` (the first round) ships every page.
    """
    started = time.perf_counter()
    try:
        cur_maps = read_pagemaps(cur_dir)
        prev_maps = read_pagemaps(prev_dir) if prev_dir is not None else {}
    except (ImageFormatError, OSError) as exc:
        raise DeltaError(f"cannot read the dumps to compare: {exc}") from exc
    if not cur_maps:
        raise DeltaError(f"{cur_dir} holds no pagemap-*.img: not a CRIU dump directory")
    deltas: list[PagemapDelta] = []
    try:
        for image_id, cur in cur_maps.items():
            deltas.append(_diff_pagemap(cur, cur_dir, prev_maps.get(image_id), prev_dir))
    except ImageFormatError as exc:
        raise DeltaError(str(exc)) from exc
    gone_maps = sum(pm.present_pages for i, pm in prev_maps.items() if i not in cur_maps)
    stats = DeltaStats(
        pages_total=sum(d.pagemap.present_pages for d in deltas),
        pages_changed=sum(d.pages_changed for d in deltas),
        pages_new=sum(d.pages_new for d in deltas),
        pages_gone=sum(d.pages_gone for d in deltas) + gone_maps,
        compare_seconds=time.perf_counter() - started,
    )
    return PageDelta(cur_dir, tuple(deltas), stats)


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


def _write_runs(
    path: Path, vaddrs: Vaddrs, pages: npt.NDArray[np.uint8], index: npt.NDArray[np.int64]
) -> None:
    """Write a runs file of ``vaddrs`` followed by the bytes of ``pages[index]``, in order."""
    runs = runs_of(vaddrs)
    with path.open("wb") as f:
        f.write(_RUNS_HEAD.pack(RUNS_MAGIC, _RUNS_WITH_DATA, runs.size, int(vaddrs.size)))
        f.write(runs.tobytes())
        for s in range(0, index.size, _COMPARE_CHUNK):
            f.write(np.ascontiguousarray(pages[index[s : s + _COMPARE_CHUNK]]).tobytes())


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
        return _check_name(v) if v is not None else None


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
        return [_check_name(n) for n in v]


def _check_name(name: str) -> str:
    # Names come from another node: never let one climb out of the directory.
    if not _SAFE_NAME.match(name) or ".." in name:
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


# ---------------------------------------------------------------- writing a delta


@dataclass(frozen=True, slots=True)
class WrittenDelta:
    """A delta directory ready to ship; ``bytes`` (its size) is what crosses the link."""

    directory: Path
    manifest: DeltaManifest
    stats: DeltaStats
    bytes: int

    @property
    def pages_total(self) -> int:
        return self.stats.pages_total

    @property
    def pages_changed(self) -> int:
        """Pages new or different since the previous round: the pages carried."""
        return self.stats.pages_shipped


def _copied_files(cur_dir: Path) -> list[str]:
    """The dump's files that travel as they are: everything but pages files and logs.

    Logs are CRIU's own diagnostics (megabytes at -v4), not images; sockets, links and
    directories are never part of an image set.
    """
    names: list[str] = []
    for p in sorted(cur_dir.iterdir()):
        if p.is_symlink() or not p.is_file() or is_pages_file(p.name) or p.suffix == ".log":
            continue
        if p.name == MANIFEST_NAME or p.name.startswith(DELTA_PAGES_PREFIX):
            raise DeltaError(f"{cur_dir} already holds delta files: not a plain dump directory")
        names.append(_check_name(p.name))
    return names


def _prepare_out(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise DeltaError(f"{out_dir} is not empty; a delta or rebuild needs a fresh directory")


def _sha256_pages(pages: npt.NDArray[np.uint8]) -> str:
    h = hashlib.sha256()
    for s in range(0, pages.shape[0], _COMPARE_CHUNK):
        h.update(np.ascontiguousarray(pages[s : s + _COMPARE_CHUNK]).data)
    return h.hexdigest()


def write_delta(
    prev_dir: Path | None,
    cur_dir: Path,
    out_dir: Path,
    *,
    digest: bool = True,
) -> WrittenDelta:
    """Compare two rounds and lay out the delta in ``out_dir``: :func:`compute_delta` then
    :func:`save_delta`."""
    return save_delta(compute_delta(prev_dir, cur_dir), out_dir, digest=digest)


def save_delta(delta: PageDelta, out_dir: Path, *, digest: bool = True) -> WrittenDelta:
    """Lay out ``delta`` in ``out_dir`` (created, must be empty) for the transfer channel.

    ``digest`` records a SHA-256 of every final pages file so that :func:`apply_delta` proves
    its rebuild byte-identical.
    """
    _prepare_out(out_dir)
    cur_dir = delta.cur_dir
    files = _copied_files(cur_dir)
    records: list[PagemapRecord] = []
    for d in delta.pagemaps:
        pm = d.pagemap
        pages = load_pages(cur_dir, pm)
        vaddrs = d.shipped_vaddrs()
        index = d.shipped
        delta_name = _check_name(f"{DELTA_PAGES_PREFIX}{pm.image_id}.img")
        _write_runs(out_dir / delta_name, vaddrs, pages, index)
        records.append(
            PagemapRecord(
                image_id=pm.image_id,
                pagemap=pm.file_name,
                pages=pm.pages_file_name,
                present_pages=pm.present_pages,
                shipped_pages=int(index.size),
                delta_pages=delta_name,
                base_pagemap_sha256=d.base_digest,
                pages_sha256=_sha256_pages(pages) if digest else None,
            )
        )
    for name in files:
        shutil.copyfile(cur_dir / name, out_dir / name)
    s = delta.stats
    manifest = DeltaManifest(
        files=files,
        pagemaps=records,
        pages_total=s.pages_total,
        pages_changed=s.pages_changed,
        pages_new=s.pages_new,
        pages_gone=s.pages_gone,
        compare_seconds=s.compare_seconds,
    )
    (out_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1))
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return WrittenDelta(out_dir, manifest, s, total)


# ---------------------------------------------------------------- applying a delta


@dataclass(frozen=True, slots=True)
class RebuildStats:
    """What :func:`apply_delta` assembled."""

    pages_total: int
    pages_from_delta: int
    pages_from_base: int
    bytes_written: int
    seconds: float


def _checked_pagemap(delta_dir: Path, rec: PagemapRecord) -> Pagemap:
    try:
        pm = decode_pagemap((delta_dir / rec.pagemap).read_bytes(), rec.image_id)
    except (ImageFormatError, OSError) as exc:
        raise DeltaError(f"{delta_dir / rec.pagemap}: {exc}") from exc
    if pm.pages_file_name != rec.pages or pm.present_pages != rec.present_pages:
        raise DeltaError(f"{delta_dir / rec.pagemap} disagrees with {MANIFEST_NAME}")
    return pm


def _base_pagemap(base_dir: Path | None, rec: PagemapRecord) -> Pagemap | None:
    if rec.base_pagemap_sha256 is None:
        return None
    if base_dir is None:
        raise DeltaError(f"the delta for {rec.pagemap} needs a base (the previous round)")
    path = base_dir / rec.pagemap
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DeltaError(f"base {base_dir} lacks {rec.pagemap}") from exc
    if hashlib.sha256(data).hexdigest() != rec.base_pagemap_sha256:
        raise DeltaError(
            f"base {path} is not the round this delta was computed against",
            hint="apply the rounds in order onto the images rebuilt from the previous round",
        )
    try:
        return decode_pagemap(data, rec.image_id)
    except ImageFormatError as exc:
        raise DeltaError(f"{path}: {exc}") from exc


def _locate(
    sorted_from: Vaddrs, wanted: Vaddrs
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Index of each ``wanted`` vaddr in ascending ``sorted_from``, and whether it is there."""
    if sorted_from.size == 0:
        return np.zeros(wanted.size, dtype=np.int64), np.zeros(wanted.size, dtype=np.bool_)
    pos = np.minimum(np.searchsorted(sorted_from, wanted), sorted_from.size - 1)
    return pos.astype(np.int64), sorted_from[pos] == wanted


def _copy_listed(delta_dir: Path, out_dir: Path, manifest: DeltaManifest) -> None:
    for name in manifest.files:
        src = delta_dir / name
        if not src.is_file():
            raise DeltaError(f"{src} is listed in {MANIFEST_NAME} but missing")
        shutil.copyfile(src, out_dir / name)


def apply_delta(base_dir: Path | None, delta_dir: Path, out_dir: Path) -> RebuildStats:
    """Rebuild the complete image set of the delta's dump in ``out_dir`` (created, empty).

    Pages come in the final pagemap's order, from the delta where shipped, else from
    ``base_dir`` (the previous round's rebuilt images) at the same vaddr; pages the final dump
    no longer has are never carried over. The size of each rebuilt pages file is checked
    against its pagemap and, where the delta carries one, its SHA-256 against the source's.
    """
    started = time.perf_counter()
    manifest = read_manifest(delta_dir)
    _prepare_out(out_dir)
    from_delta = from_base = written = 0
    for rec in manifest.pagemaps:
        pm = _checked_pagemap(delta_dir, rec)
        base_pm = _base_pagemap(base_dir, rec)
        shipped = read_runs(delta_dir / rec.delta_pages)
        assert shipped.pages is not None
        final_v = pm.present_vaddrs()
        # Where each final page comes from: its slot in the delta, else in the base.
        d_pos, in_delta = _locate(shipped.vaddrs, final_v)
        if int(in_delta.sum()) != shipped.vaddrs.size:
            raise DeltaError(f"{rec.delta_pages} carries pages that {rec.pagemap} does not list")
        need = np.flatnonzero(~in_delta)
        base_pages = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        b_pos = np.zeros(final_v.size, dtype=np.int64)
        if need.size:
            if base_pm is None or base_dir is None:
                raise DeltaError(
                    f"{rec.pagemap} needs {need.size} pages from a base, but the delta has none"
                )
            base_pages = _load(base_dir, base_pm)
            base_v = base_pm.present_vaddrs()
            order = np.argsort(base_v, kind="stable")
            pos, found = _locate(base_v[order], final_v[need])
            if not found.all():
                missing = int(final_v[need][~found][0])
                raise DeltaError(
                    f"page {missing:#x} of {rec.pagemap} is neither in the delta nor in "
                    f"the base {base_dir}"
                )
            b_pos[need] = order[pos]
        if rec.pages is not None:
            path = out_dir / rec.pages
            digest = _write_rebuilt(
                path,
                in_delta=in_delta,
                d_pos=d_pos,
                delta_pages=shipped.pages,
                b_pos=b_pos,
                base_pages=base_pages,
                digest=rec.pages_sha256 is not None,
            )
            size = path.stat().st_size
            if size != pm.pages_size:
                raise DeltaError(
                    f"rebuilt {path} has {size} bytes, {rec.pagemap} needs {pm.pages_size}"
                )
            written += size
            if rec.pages_sha256 is not None and digest != rec.pages_sha256:
                raise DeltaError(
                    f"rebuilt {path} differs from the source's final pages (SHA-256 mismatch)",
                    hint="the base is not the previous round's complete image set",
                )
        have = np.flatnonzero(in_delta)
        from_delta += int(have.size)
        from_base += int(need.size)
    _copy_listed(delta_dir, out_dir, manifest)
    return RebuildStats(
        pages_total=from_delta + from_base,
        pages_from_delta=from_delta,
        pages_from_base=from_base,
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )


def _write_rebuilt(
    path: Path,
    *,
    in_delta: npt.NDArray[np.bool_],
    d_pos: npt.NDArray[np.int64],
    delta_pages: npt.NDArray[np.uint8],
    b_pos: npt.NDArray[np.int64],
    base_pages: npt.NDArray[np.uint8],
    digest: bool,
) -> str | None:
    """Write the final pages chunk by chunk (bounded memory); their SHA-256 if asked."""
    h = hashlib.sha256() if digest else None
    with path.open("wb") as f:
        for s in range(0, in_delta.size, _COMPARE_CHUNK):
            e = min(s + _COMPARE_CHUNK, in_delta.size)
            sel = in_delta[s:e]
            chunk = np.empty((e - s, PAGE_SIZE), dtype=np.uint8)
            rows = np.flatnonzero(sel)
            if rows.size:
                chunk[rows] = _gather(delta_pages, d_pos[s:e][rows])
            rows = np.flatnonzero(~sel)
            if rows.size:
                chunk[rows] = _gather(base_pages, b_pos[s:e][rows])
            f.write(chunk.data)
            if h is not None:
                h.update(chunk.data)
    return h.hexdigest() if h is not None else None


def _load(directory: Path, pm: Pagemap) -> npt.NDArray[np.uint8]:
    try:
        return load_pages(directory, pm)
    except ImageFormatError as exc:
        raise DeltaError(str(exc)) from exc
