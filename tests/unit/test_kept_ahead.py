"""Post-copy's live copy sent ahead: what it takes, its image set, the kept pages coded against
it, the lazy pages it serves."""

from __future__ import annotations

import os
import re
from array import array
from pathlib import Path

import pytest

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.errors import LazyLayoutError
from fogmig.platform.migration.lazy.kept import decode_kept, encode_kept, write_base
from fogmig.platform.migration.lazy.warm import fill_from_base, working_set, write_remote
from fogmig.platform.runtime.pagemap import (
    PE_LAZY,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    load_pages,
    read_pagemaps,
    write_pagemap,
)
from fogmig.platform.runtime.snapshot import TaskPages, copied_mappings, live_copy

P = PAGE_SIZE

MAPS = """\
00400000-00401000 r--p 00000000 08:01 12 /usr/bin/python3.11
00947000-00a85000 rw-p 00546000 08:01 12 /usr/bin/python3.11
00a85000-00aaa000 rw-p 00000000 00:00 0
0654c000-069bc000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000001000 ---p 00000000 08:01 40 /usr/lib/libc.so.6
7f0000002000-7f0000003000 rw-s 00000000 00:05 41 /dev/shm/x
7f0000004000-7f0000006000 r--p 00000000 08:01 42 /usr/lib/libcrypto.so.3
7fffc390f000-7fffc3930000 rw-p 00000000 00:00 0                  [stack]
7fffc39a0000-7fffc39a2000 r-xp 00000000 00:00 0                  [vdso]
"""


def page(fill: int) -> bytes:
    return bytes([fill]) * P


def test_the_copy_takes_file_mappings_the_stack_and_small_anonymous_memory() -> None:
    kept = [  # from the smallest up
        (0x400000, 0x401000),
        (0x7F0000004000, 0x7F0000006000),
        (0x7FFFC390F000, 0x7FFFC3930000),
        (0x947000, 0xA85000),
    ]
    assert [(m.start, m.end) for m in copied_mappings(MAPS, small_below=0)] == kept
    # Kept mappings first (they travel anyway), then the others from the smallest up.
    small = [*kept, (0xA85000, 0xAAA000), (0x654C000, 0x69BC000)]
    assert [(m.start, m.end) for m in copied_mappings(MAPS)] == small
    # The heap (4.4 MiB) counts as bulk below 4 MiB.
    assert (0x654C000, 0x69BC000) not in [
        (m.start, m.end) for m in copied_mappings(MAPS, small_below=4 << 20)
    ]


def test_of_a_bulk_mapping_the_copy_takes_only_its_ends() -> None:
    bulk = "7f1000000000-7f1005000000 rw-p 00000000 00:00 0\n"  # 80 MiB
    got = [(m.start, m.end) for m in copied_mappings(bulk)]
    assert got == [(0x7F1000000000, 0x7F1000200000), (0x7F1004E00000, 0x7F1005000000)]
    assert copied_mappings(bulk, small_below=0) == []


def test_a_live_copy_of_this_process_holds_its_private_file_pages_and_stack() -> None:
    snap = live_copy(os.getpid())
    pages = snap[next(iter(snap))]
    assert len(snap) >= 1
    assert len(pages) > 0
    assert len(pages.data) == len(pages) * P
    assert list(pages.vaddrs) == sorted(set(pages.vaddrs))
    # Every page copied is one of this process's (its mappings may have grown since).
    spans = [
        (int(m[1], 16), int(m[2], 16))
        for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) ", _maps(), re.M)
    ]
    assert all(any(a <= v < b for a, b in spans) for v in pages.vaddrs)
    stack = next(
        (int(m[1], 16), int(m[2], 16))
        for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*\[stack\]$", _maps(), re.M)
    )
    assert any(stack[0] <= v < stack[1] for v in pages.vaddrs)


def test_the_copy_leaves_what_exceeds_its_share_of_the_memory_lazy() -> None:
    buf = bytearray(os.urandom(1 << 20)) * 24  # 24 MiB of state in a mapping of its own
    whole = live_copy(os.getpid(), share=1.0)
    least = live_copy(os.getpid(), share=0.0)
    copied = sum(len(p) for p in whole.values()) * P
    kept_only = sum(len(p) for p in least.values()) * P
    assert copied >= len(buf) > kept_only
    assert kept_only > 0  # the kept pages go whatever the share


def _maps() -> str:
    return Path(f"/proc/{os.getpid()}/maps").read_text()


def test_the_copy_is_an_image_set_named_as_the_dump_names_its_tasks(tmp_path: Path) -> None:
    copy = TaskPages(
        array("Q", [0x10000, 0x11000, 0x20000]), bytearray(page(1) + page(2) + page(3))
    )
    assert write_base(tmp_path, {1: copy, 7: TaskPages()}) == 3
    maps = read_pagemaps(tmp_path)
    assert set(maps) == {"1"}
    assert [(e.vaddr, e.nr_pages) for e in maps["1"].entries] == [(0x10000, 2), (0x20000, 1)]
    assert load_pages(tmp_path, maps["1"]).tobytes() == bytes(copy.data)


def test_kept_pages_coded_against_the_copy_sent_ahead_rebuild_byte_identical(
    tmp_path: Path,
) -> None:
    ahead = tmp_path / "ahead"
    patterned = bytes(range(256)) * (P // 256)
    copy = TaskPages(array("Q", [0x10000, 0x11000]), bytearray(patterned + page(9)))
    write_base(ahead, {1: copy})
    # The lazy layout after the freeze: two kept pages (one changed by a byte since the copy,
    # one the copy never saw), a lazy run, and an unchanged kept page.
    lazy = tmp_path / "lazy"
    lazy.mkdir()
    changed = bytearray(patterned)
    changed[100] ^= 0x40
    kept = bytes(changed) + page(9) + page(5)
    entries = (
        PagemapEntry(0x10000, 2, PE_PRESENT),
        PagemapEntry(0x12000, 3, PE_LAZY),
        PagemapEntry(0x30000, 1, PE_PRESENT),
    )
    write_pagemap(lazy, Pagemap("1", 4, entries))
    (lazy / "pages-4.img").write_bytes(kept)
    stats = encode_kept(lazy, ahead)
    assert (stats.pages, stats.xor_pages) == (3, 2)
    assert stats.coded_bytes < stats.plain_bytes // 4
    assert not (lazy / "pages-4.img").exists()
    assert decode_kept(lazy, ahead) == 1
    assert (lazy / "pages-4.img").read_bytes() == kept


def test_lazy_pages_the_copy_holds_unchanged_are_served_from_it(tmp_path: Path) -> None:
    ahead = tmp_path / "ahead"
    # The copy: three heap pages; one of them is written before the freeze.
    write_base(
        ahead,
        {
            1: TaskPages(
                array("Q", [0x50000, 0x51000, 0x52000]), bytearray(page(1) + page(2) + page(3))
            )
        },
    )
    full = tmp_path / "full"
    full.mkdir()
    frozen = [(0x50000, page(1)), (0x51000, page(7)), (0x52000, page(3)), (0x90000, page(4))]
    write_pagemap(
        full, Pagemap("1", 2, tuple(PagemapEntry(v, 1, PE_PRESENT | PE_LAZY) for v, _ in frozen))
    )
    (full / "pages-2.img").write_bytes(b"".join(p for _, p in frozen))
    lazy = tmp_path / "lazy"
    lazy.mkdir()
    write_pagemap(lazy, Pagemap("1", 2, tuple(PagemapEntry(v, 1, PE_LAZY) for v, _ in frozen)))
    (lazy / "pages-2.img").write_bytes(b"")
    remote = write_remote(lazy, full, ahead, "changed.json")
    # The written page and the bulk page the copy never saw come from the source.
    assert remote.pages == {1: [0x51000, 0x90000]}
    assert remote.changed == {1: [0x51000]}
    assert (remote.stats.local, remote.stats.remote, remote.stats.changed) == (2, 2, 1)
    assert (lazy / "changed.json").read_text() == '{"1": [331776, 589824]}'
    # Without a copy, every lazy page comes from the source.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_remote(lazy, full, empty, "c.json").pages == {1: [v for v, _ in frozen]}


def test_the_working_set_takes_every_changed_page_and_written_ones_within_the_limit() -> None:
    written = {1: [0x3000, 0x1000, 0x5000]}
    changed = {1: [0x1000, 0x2000, 0x4000], 7: [0x9000]}
    assert working_set(written, changed, 10) == {
        1: [0x3000, 0x5000, 0x1000, 0x2000, 0x4000],
        7: [0x9000],
    }
    # Changed pages are cheap (coded against the copy): the limit is for the others.
    assert working_set(written, changed, 1) == {1: [0x3000, 0x1000, 0x2000, 0x4000], 7: [0x9000]}
    assert working_set(written, changed, 0, cap=2) == {1: [0x1000, 0x2000]}


def test_the_destination_restores_the_pages_its_copy_holds_and_leaves_the_rest_lazy(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base"
    write_base(base, {1: TaskPages(array("Q", [0x50000, 0x52000]), bytearray(page(1) + page(3)))})
    images = tmp_path / "lazy"
    images.mkdir()
    entries = (
        PagemapEntry(0x10000, 1, PE_PRESENT),  # a kept page, bytes in the pages file
        PagemapEntry(0x50000, 4, PE_LAZY),  # 0x51000 and 0x53000 changed since the copy
    )
    write_pagemap(images, Pagemap("1", 3, entries))
    (images / "pages-3.img").write_bytes(page(8))
    filled = fill_from_base(images, base, {1: [0x51000, 0x53000]})
    assert filled == 2
    pm = read_pagemaps(images)["1"]
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (0x10000, 1, PE_PRESENT),
        (0x50000, 1, PE_PRESENT),
        (0x51000, 1, PE_LAZY),
        (0x52000, 1, PE_PRESENT),
        (0x53000, 1, PE_LAZY),
    ]
    assert (images / "pages-3.img").read_bytes() == page(8) + page(1) + page(3)
    # A page neither remote nor in the copy cannot be restored: refused, not guessed.
    write_pagemap(images, Pagemap("1", 3, (PagemapEntry(0x60000, 1, PE_LAZY),)))
    (images / "pages-3.img").write_bytes(b"")
    with pytest.raises(LazyLayoutError, match="neither remote nor in the copy"):
        fill_from_base(images, base, {1: []})
