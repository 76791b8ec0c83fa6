"""Applying a page delta at the destination: rebuilding the complete image set of a round.

Pages come from the delta where it carries them, else from the previous round's rebuilt
images; sizes and, where the delta carries them, SHA-256 digests prove the rebuild.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.delta.layout import (
    CHUNK_PAGES,
    MANIFEST_NAME,
    DeltaError,
    DeltaManifest,
    PagemapRecord,
    gather,
    prepare_out,
    read_manifest,
    read_runs,
)
from fogmig.platform.migration.delta.pagecodec import KIND_XOR
from fogmig.platform.runtime.image import ImageFormatError
from fogmig.platform.runtime.pagemap import Pagemap, Vaddrs, decode_pagemap, load_pages, locate


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


@dataclass(frozen=True, slots=True)
class PreparedPagemap:
    """One pagemap of a delta, checked and decoded: the final pagemap, the base's, the
    shipped pages (XOR ones already applied to the base), for each final page its row among
    the shipped ones and whether it was shipped, and for the others their row in the base."""

    pm: Pagemap
    base_pm: Pagemap | None
    pages: npt.NDArray[np.uint8]
    d_pos: npt.NDArray[np.int64]
    in_delta: npt.NDArray[np.bool_]
    b_pos: npt.NDArray[np.int64]

    @property
    def from_base(self) -> int:
        return int(self.in_delta.size - np.count_nonzero(self.in_delta))


def prepare_pagemap(delta_dir: Path, base_dir: Path | None, rec: PagemapRecord) -> PreparedPagemap:
    pm = _checked_pagemap(delta_dir, rec)
    base_pm = _base_pagemap(base_dir, rec)
    shipped = read_runs(delta_dir / rec.delta_pages)
    if shipped.pages is None or shipped.kinds is None:
        raise DeltaError(f"{rec.delta_pages} carries no page bytes")
    final_v = pm.present_vaddrs()
    # Where each final page comes from: its slot in the delta, else in the base.
    d_pos, in_delta = locate(shipped.vaddrs, final_v)
    if int(in_delta.sum()) != shipped.vaddrs.size:
        raise DeltaError(f"{rec.delta_pages} carries pages that {rec.pagemap} does not list")
    need = np.flatnonzero(~in_delta)
    xor_rows = np.flatnonzero(shipped.kinds == KIND_XOR)
    b_pos = np.zeros(final_v.size, dtype=np.int64)
    if need.size or xor_rows.size:
        if base_pm is None or base_dir is None:
            raise DeltaError(
                f"{rec.pagemap} needs {need.size + xor_rows.size} pages from a base, but "
                "the delta has none"
            )
        base_pages = _load(base_dir, base_pm)  # (its size checked against its pagemap)
        base_v = base_pm.present_vaddrs()
        b_pos[need] = _in_base(base_v, final_v[need], rec, base_dir)
        if xor_rows.size:
            at = _in_base(base_v, shipped.vaddrs[xor_rows], rec, base_dir)
            shipped.pages[xor_rows] ^= base_pages[at]
    return PreparedPagemap(pm, base_pm, shipped.pages, d_pos, in_delta, b_pos)


def _in_base(
    base_v: Vaddrs, wanted: Vaddrs, rec: PagemapRecord, base: Path
) -> npt.NDArray[np.int64]:
    """Row in the base pages of each ``wanted`` vaddr; every one must be there."""
    at, found = locate(base_v, wanted)
    if not found.all():
        missing = int(wanted[~found][0])
        raise DeltaError(
            f"page {missing:#x} of {rec.pagemap} is neither in the delta nor in the base {base}"
        )
    return at


def copy_listed(delta_dir: Path, out_dir: Path, manifest: DeltaManifest) -> None:
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
    prepare_out(out_dir)
    from_delta = from_base = written = 0
    for rec in manifest.pagemaps:
        got = prepare_pagemap(delta_dir, base_dir, rec)
        pm, base_pm, in_delta = got.pm, got.base_pm, got.in_delta
        if rec.pages is not None:
            path = out_dir / rec.pages
            base_file = (
                base_dir / base_pm.pages_file_name
                if base_dir is not None and base_pm is not None and base_pm.pages_file_name
                else None
            )
            digest = _write_rebuilt(
                path,
                in_delta=in_delta,
                d_pos=got.d_pos,
                delta_pages=got.pages,
                b_pos=got.b_pos,
                base_file=base_file,
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
        from_delta += int(np.count_nonzero(in_delta))
        from_base += got.from_base
    copy_listed(delta_dir, out_dir, manifest)
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
    base_file: Path | None,
    digest: bool,
) -> str | None:
    """Write the final pages file; its SHA-256 if asked.

    Unchanged pages are copied from the base's pages file by the kernel, run by run
    (``copy_file_range``: no pass through this process, about ten times faster than reading
    and writing them on this machine's disks); shipped pages are written where they belong.
    This is the part of a pre-copy's frozen window that grows with the state's size.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    base_fd = os.open(base_file, os.O_RDONLY | os.O_CLOEXEC) if base_file is not None else None
    try:
        os.ftruncate(fd, in_delta.size * PAGE_SIZE)
        for first, count, from_delta in _runs(in_delta, d_pos, b_pos):
            if from_delta:
                data = gather(delta_pages, d_pos[first : first + count])
                _pwrite_all(fd, memoryview(data.tobytes()), first * PAGE_SIZE)
            else:
                assert base_fd is not None
                _copy_all(base_fd, fd, int(b_pos[first]) * PAGE_SIZE, first * PAGE_SIZE, count)
    finally:
        os.close(fd)
        if base_fd is not None:
            os.close(base_fd)
    return _sha256_file(path) if digest else None


def _runs(
    in_delta: npt.NDArray[np.bool_], d_pos: npt.NDArray[np.int64], b_pos: npt.NDArray[np.int64]
) -> Iterator[tuple[int, int, bool]]:
    """(first page, pages, from the delta?) runs of the final pages file: consecutive pages
    from the same side and, for the base, at consecutive offsets there (one copy each)."""
    n = in_delta.size
    if n == 0:
        return
    src = np.where(in_delta, d_pos, b_pos)
    # A run breaks where the side changes or the source offset does not follow on.
    breaks = np.flatnonzero((in_delta[1:] != in_delta[:-1]) | (src[1:] != src[:-1] + 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        yield s, e - s, bool(in_delta[s])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _copy_all(src: int, dst: int, src_offset: int, dst_offset: int, pages: int) -> None:
    left = pages * PAGE_SIZE
    while left > 0:
        try:
            n = os.copy_file_range(src, dst, left, src_offset, dst_offset)
        except OSError:
            # Another filesystem or no support: copy through this process.
            chunk = os.pread(src, min(left, CHUNK_PAGES * PAGE_SIZE), src_offset)
            n = os.pwrite(dst, chunk, dst_offset) if chunk else 0
        if n <= 0:
            raise DeltaError(f"short copy from the base: {left} bytes left at {src_offset}")
        src_offset, dst_offset, left = src_offset + n, dst_offset + n, left - n


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_PAGES * PAGE_SIZE):
            h.update(chunk)
    return h.hexdigest()


def _load(directory: Path, pm: Pagemap) -> npt.NDArray[np.uint8]:
    try:
        return load_pages(directory, pm)
    except ImageFormatError as exc:
        raise DeltaError(str(exc)) from exc
