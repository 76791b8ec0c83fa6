"""Pre-copy's final image at the destination as a child of the last round, not a rebuild.

Rebuilding the final image set copies every unchanged page of the last round into a new pages
file (``apply.apply_delta``): about 50 ms for the 75 MB sensor, inside the frozen window. CRIU
can restore from a chain instead, as after its own pre-dumps: a pagemap entry flagged
``PE_PARENT`` says "these pages are in the image set behind the ``parent`` link". So the final
image set is written as the final pagemaps, each present run split into the pages the delta
carries (in a small pages file of their own) and the others marked in the parent, plus a
``parent`` link to the last round's complete images, which stay until the migration's
directory goes.

Every page not in the delta must be in the base; the check is the rebuild's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.delta.apply import (
    RebuildStats,
    copy_listed,
    prepare_pagemap,
)
from fogmig.platform.migration.delta.layout import prepare_out, read_manifest
from fogmig.platform.runtime.pagemap import (
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    flag_runs,
    write_pagemap,
)

PARENT_LINK = "parent"
"""CRIU's name for the link from an image set to the one it builds on."""


def apply_delta_linked(base_dir: Path, delta_dir: Path, out_dir: Path) -> RebuildStats:
    """Write the delta's dump into ``out_dir`` (created, empty) as a child of ``base_dir``."""
    started = time.perf_counter()
    manifest = read_manifest(delta_dir)
    prepare_out(out_dir)
    # The files that go as they are, the final pagemaps among them: rewritten below.
    copy_listed(delta_dir, out_dir, manifest)
    from_delta = from_base = written = 0
    for rec in manifest.pagemaps:
        got = prepare_pagemap(delta_dir, base_dir, rec)  # every page not shipped is in the base
        pm, in_delta, d_pos = got.pm, got.in_delta, got.d_pos
        entries: list[PagemapEntry] = []
        rows: list[int] = []
        i = 0
        for e in pm.entries:
            if not e.present:
                entries.append(e)
                continue
            for first, n, shipped in flag_runs(in_delta[i : i + e.nr_pages]):
                vaddr = e.vaddr + first * PAGE_SIZE
                if shipped:
                    entries.append(PagemapEntry(vaddr, n, e.flags))
                    rows.extend(int(r) for r in d_pos[i + first : i + first + n])
                else:
                    entries.append(PagemapEntry(vaddr, n, (e.flags & ~PE_PRESENT) | PE_PARENT))
            i += e.nr_pages
        if rec.pages is not None and pm.pages_id is not None:
            data = got.pages[np.asarray(rows, dtype=np.int64)].tobytes() if rows else b""
            (out_dir / rec.pages).write_bytes(data)
            written += len(data)
        write_pagemap(out_dir, Pagemap(pm.image_id, pm.pages_id, tuple(entries)))
        from_delta += int(np.count_nonzero(in_delta))
        from_base += got.from_base
    os.symlink(os.path.relpath(base_dir, out_dir), out_dir / PARENT_LINK)
    return RebuildStats(
        pages_total=from_delta + from_base,
        pages_from_delta=from_delta,
        pages_from_base=from_base,
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )
