"""Computing a page delta: which pages of a round's full dump the destination lacks.

Each round is a full dump; :func:`compute_delta` compares it page by page (keyed by pagemap and
vaddr) with the previous round. A page ships when its vaddr is new or its 4 KiB differ.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.delta.layout import CHUNK_PAGES, DeltaError, gather
from fogmig.platform.runtime.image import ImageFormatError
from fogmig.platform.runtime.pagemap import Pagemap, Vaddrs, load_pages, read_pagemaps


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

    ``shipped`` holds indices into the current pages file (ascending vaddr order), and
    ``base_index`` for each the index of the previous round's page at its vaddr (-1: new).
    ``base_digest`` identifies the previous round's pagemap file (None without a previous one).
    """

    pagemap: Pagemap
    shipped: npt.NDArray[np.int64]
    pages_changed: int
    pages_new: int
    pages_gone: int
    base_digest: str | None
    base: Pagemap | None = None
    base_index: npt.NDArray[np.int64] | None = None

    def shipped_vaddrs(self) -> Vaddrs:
        return self.pagemap.present_vaddrs()[self.shipped]


@dataclass(frozen=True, slots=True)
class PageDelta:
    """The difference of the dump in ``cur_dir`` against the previous round."""

    cur_dir: Path
    pagemaps: tuple[PagemapDelta, ...]
    stats: DeltaStats
    prev_dir: Path | None = None


def _digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _differing(
    cur_pages: npt.NDArray[np.uint8],
    cur_idx: npt.NDArray[np.int64],
    prev_pages: npt.NDArray[np.uint8],
    prev_idx: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """For each matched pair, whether the two 4 KiB pages differ (compared as u64 words)."""
    out = np.zeros(cur_idx.size, dtype=np.bool_)
    for s in range(0, cur_idx.size, CHUNK_PAGES):
        ci = cur_idx[s : s + CHUNK_PAGES]
        pi = prev_idx[s : s + CHUNK_PAGES]
        n = ci.size
        a = gather(cur_pages, ci)
        b = gather(prev_pages, pi)
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
        base=prev,
        base_index=np.where(matched[shipped], prev_of_cur[shipped], -1).astype(np.int64),
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
    return PageDelta(cur_dir, tuple(deltas), stats, prev_dir)
