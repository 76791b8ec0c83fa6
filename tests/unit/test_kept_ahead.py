"""Post-copy's kept pages sent ahead: the live copy, its image set, the delta against it."""

from __future__ import annotations

import os
import re
from array import array
from pathlib import Path

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.lazy.kept import decode_kept, encode_kept, write_base
from fogmig.platform.runtime.pagemap import (
    PE_LAZY,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    load_pages,
    read_pagemaps,
    write_pagemap,
)
from fogmig.platform.runtime.snapshot import TaskPages, kept_mappings, kept_snapshot

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


def test_the_kept_mappings_are_private_file_mappings_and_the_stack() -> None:
    assert kept_mappings(MAPS) == [
        (0x400000, 0x401000),
        (0x947000, 0xA85000),
        (0x7F0000004000, 0x7F0000006000),
        (0x7FFFC390F000, 0x7FFFC3930000),
    ]


def test_a_live_copy_of_this_process_holds_its_private_file_pages_and_stack() -> None:
    snap = kept_snapshot(os.getpid())
    pages = snap[next(iter(snap))]
    assert len(snap) >= 1
    assert len(pages) > 0
    assert len(pages.data) == len(pages) * P
    assert list(pages.vaddrs) == sorted(set(pages.vaddrs))
    maps = kept_mappings(_maps())
    assert all(any(s <= v < e for s, e in maps) for v in pages.vaddrs)
    stack = next(
        (int(m[1], 16), int(m[2], 16))
        for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*\[stack\]$", _maps(), re.M)
    )
    assert any(stack[0] <= v < stack[1] for v in pages.vaddrs)


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
