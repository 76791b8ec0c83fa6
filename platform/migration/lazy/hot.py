"""The service's working set, shipped with a lazy restore's execution state.

A restored service that must fault in every page it touches waits a round trip per page, and
on a slow link a reply queues behind the stream's bulk: measured on the orchestration link,
the first answer came 2.7 s after a 0.65 s restore; on the mobility link 17-23 s. The pages it
needs first are the ones it worked on just before the freeze, which the source knows
(``runtime/access.written_pages``). The source copies them from its final image into
``fogmig-hot.img`` (their addresses, per task, in ``fogmig-hot.json``), a few hundred pages
that travel with the lazy layout in the frozen window, compressed with it; the destination's
stream takes them as arrived before the service runs, so those faults are answered at once.

Every page listed must be one of the image's lazy pages: the page server would otherwise serve
a page the daemon never asks for, or miss one it does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import LazyLayoutError, PageNotFoundError
from fogmig.platform.migration.lazy.layout import lazy_vaddrs
from fogmig.platform.migration.lazy.sources import LocalImagePages

log = logging.getLogger(__name__)

HOT_INDEX = "fogmig-hot.json"
HOT_PAGES = "fogmig-hot.img"

HOT_BUDGET_S = 0.25
"""What the working set may add to the frozen window on the measured link (its pages compress
to about a third, so the budget in raw pages is three times the link's bytes in that time)."""
MIN_HOT_PAGES, MAX_HOT_PAGES = 64, 1024


def hot_page_limit(link_bytes_per_s: float | None) -> int:
    """How many working-set pages to ship with the execution state over this link."""
    if not link_bytes_per_s or link_bytes_per_s <= 0:
        return MAX_HOT_PAGES // 2
    pages = int(link_bytes_per_s * HOT_BUDGET_S * 3 / PAGE_SIZE)
    return max(MIN_HOT_PAGES, min(MAX_HOT_PAGES, pages))


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(PAGE_SIZE, "little")


def write_hot(
    lazy_dir: Path,
    full_dir: Path,
    hot: Mapping[int, Sequence[int]],
    *,
    among: Mapping[int, Collection[int]] | None = None,
    base_dir: Path | None = None,
) -> int:
    """Copy the ``hot`` pages that the lazy layout in ``lazy_dir`` leaves lazy (or, for
    hybrid, that are ``among`` the pages fetched from the source) from the complete image in
    ``full_dir``; how many were written (0: no file).

    With ``base_dir`` (hybrid: the last round, which the destination holds) a page that the
    base has travels as its XOR with the base's page: a page the service worked on differs
    from it in a few bytes (reference counts), so it compresses to almost nothing."""
    lazy = lazy_vaddrs(lazy_dir) if among is None else among
    index: dict[str, list[int]] = {}
    xored: dict[str, list[int]] = {}
    with contextlib.ExitStack() as stack:
        pages = stack.enter_context(LocalImagePages(full_dir))
        base = stack.enter_context(LocalImagePages(base_dir)) if base_dir is not None else None
        out = stack.enter_context((lazy_dir / HOT_PAGES).open("wb"))
        for task, vaddrs in sorted(hot.items()):
            wanted = set(lazy.get(task, ()))
            kept = sorted(v for v in set(vaddrs) if v in wanted)
            for vaddr in kept:
                page = pages.read_page(task, vaddr)
                old = _base_page(base, task, vaddr)
                if old is not None:
                    page = _xor(page, old)
                    xored.setdefault(str(task), []).append(vaddr)
                out.write(page)
            if kept:
                index[str(task)] = kept
    count = sum(len(v) for v in index.values())
    if count:
        (lazy_dir / HOT_INDEX).write_text(json.dumps({"pages": index, "xor": xored}))
    else:
        (lazy_dir / HOT_PAGES).unlink()
    return count


def _base_page(base: LocalImagePages | None, task: int, vaddr: int) -> bytes | None:
    if base is None:
        return None
    try:
        return base.read_page(task, vaddr)
    except PageNotFoundError:
        return None


def read_hot(
    lazy_dir: Path, *, base: LocalImagePages | None = None
) -> dict[tuple[int, int], bytes]:
    """The pages :func:`write_hot` shipped, by ``(task, vaddr)``; empty if there are none.
    ``base``: the image the XOR-coded pages were coded against (hybrid's last round).

    A damaged or inconsistent pair of files is refused (a :class:`LazyLayoutError`): serving
    a wrong page would corrupt the service.
    """
    index_path, pages_path = lazy_dir / HOT_INDEX, lazy_dir / HOT_PAGES
    if not index_path.exists():
        return {}
    try:
        raw = json.loads(index_path.read_text())
        index = {int(task): [int(v) for v in vaddrs] for task, vaddrs in raw["pages"].items()}
        xored = {(int(t), int(v)) for t, vaddrs in raw.get("xor", {}).items() for v in vaddrs}
        data = pages_path.read_bytes()
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise LazyLayoutError(f"{lazy_dir}: the working set cannot be read: {exc}") from exc
    count = sum(len(v) for v in index.values())
    if len(data) != count * PAGE_SIZE:
        raise LazyLayoutError(
            f"{pages_path}: {len(data)} bytes for the {count} pages {HOT_INDEX} lists"
        )
    out: dict[tuple[int, int], bytes] = {}
    at = 0
    for task, vaddrs in index.items():
        for vaddr in vaddrs:
            if vaddr % PAGE_SIZE:
                raise LazyLayoutError(f"{index_path}: {vaddr:#x} is not a page address")
            page = data[at : at + PAGE_SIZE]
            at += PAGE_SIZE
            if (task, vaddr) in xored:
                old = _base_page(base, task, vaddr)
                if old is None:
                    raise LazyLayoutError(
                        f"{index_path}: page {vaddr:#x} of task {task} is coded against a base "
                        "page this node does not hold"
                    )
                page = _xor(page, old)
            out[(task, vaddr)] = page
    return out
