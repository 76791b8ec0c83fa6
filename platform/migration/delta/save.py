"""Saving a page delta for the link: the delta directory the transfer channel ships.

:func:`save_delta` lays out a computed delta; :func:`write_delta` computes and saves in one go.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fogmig.platform.migration.delta.compute import DeltaStats, PageDelta, compute_delta
from fogmig.platform.migration.delta.layout import (
    CHUNK_PAGES,
    DELTA_PAGES_PREFIX,
    MANIFEST_NAME,
    DeltaError,
    DeltaManifest,
    PagemapRecord,
    check_name,
    prepare_out,
    write_runs,
)
from fogmig.platform.runtime.pagemap import is_pages_file, load_pages


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
        names.append(check_name(p.name))
    return names


def _sha256_pages(pages: npt.NDArray[np.uint8]) -> str:
    h = hashlib.sha256()
    for s in range(0, pages.shape[0], CHUNK_PAGES):
        h.update(np.ascontiguousarray(pages[s : s + CHUNK_PAGES]).data)
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
    prepare_out(out_dir)
    cur_dir = delta.cur_dir
    files = _copied_files(cur_dir)
    records: list[PagemapRecord] = []
    pages_xor = plain = stored = 0
    for d in delta.pagemaps:
        pm = d.pagemap
        pages = load_pages(cur_dir, pm)
        vaddrs = d.shipped_vaddrs()
        index = d.shipped
        base_pages = None
        if d.base is not None and delta.prev_dir is not None and d.base_index is not None:
            base_pages = load_pages(delta.prev_dir, d.base)
        delta_name = check_name(f"{DELTA_PAGES_PREFIX}{pm.image_id}.img")
        runs = write_runs(
            out_dir / delta_name,
            vaddrs,
            pages,
            index,
            base_pages=base_pages,
            base_index=d.base_index,
        )
        pages_xor += runs.pages_xor
        plain += runs.plain_bytes
        stored += runs.stored_bytes
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
        pages_xor=pages_xor,
        page_bytes_plain=plain,
        page_bytes_stored=stored,
        compare_seconds=s.compare_seconds,
    )
    (out_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1))
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return WrittenDelta(out_dir, manifest, s, total)
