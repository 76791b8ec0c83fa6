"""What a service touched, per mapping: smaps parsing and the container's process tree."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

from fogmig.platform.runtime.access import (
    BULK_MAPPING_BYTES,
    PageDigests,
    Region,
    accessed_regions,
    clear_accessed,
    page_digests,
    parse_smaps,
    private_writable,
    process_tree,
    written_pages,
)

SMAPS = """\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  64 kB
Referenced:           40 kB
Anonymous:            64 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0004b00000 rw-p 00000000 00:00 0
Size:              76800 kB
Referenced:            8 kB
VmFlags: rd wr mr mw me ac
"""


def test_smaps_mappings_and_their_referenced_bytes() -> None:
    heap, bulk = parse_smaps(SMAPS)
    assert heap == Region(0x55D0C0000000, 0x55D0C0021000, 40 * 1024)
    assert bulk.referenced == 8192
    assert heap.density > 0.3 > bulk.density


def fake_proc(root: Path) -> Path:
    for pid, nspid, children in ((4000, 1, "4001"), (4001, 7, "")):
        d = root / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True)
        (d / "task" / str(pid) / "children").write_text(children)
        (d / "status").write_text(f"Name:\tpython3\nNSpid:\t{pid}\t{nspid}\n")
        (d / "smaps").write_text(SMAPS)
        (d / "clear_refs").write_text("")
    return root


def test_the_container_tree_by_namespace_pid(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert process_tree(4000, proc=proc) == {4000: 1, 4001: 7}
    assert clear_accessed(4000, proc=proc) == 2
    assert (proc / "4001" / "clear_refs").read_text() == "1\n"
    regions = accessed_regions(4000, proc=proc)
    assert sorted(regions) == [1, 7]
    assert regions[7][0].referenced == 40 * 1024
    assert process_tree(999, proc=proc) == {}  # gone: nothing, no error


# ---------------------------------------------------------------------- pages written


MAPS = """\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/python3
00651000-00652000 rw-p 00051000 08:02 173521      /usr/bin/python3
01ae5000-01b06000 rw-p 00000000 00:00 0           [heap]
7f2c20000000-7f2c25000000 rw-p 00000000 00:00 0
7f2c30000000-7f2c30001000 rw-s 00000000 00:05 1234 /dev/zero (deleted)
7ffc5a1e0000-7ffc5a201000 rw-p 00000000 00:00 0   [stack]
7ffc5a3f0000-7ffc5a3f4000 r--p 00000000 00:00 0   [vvar]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""


def test_private_writable_mappings_only() -> None:
    assert private_writable(MAPS) == [
        (0x00651000, 0x00652000),
        (0x01AE5000, 0x01B06000),
        (0x7F2C20000000, 0x7F2C25000000),
        (0x7FFC5A1E0000, 0x7FFC5A201000),
    ]


def _digests(pages: list[tuple[int, int, int]]) -> PageDigests:
    d = PageDigests()
    for vaddr, crc, size in pages:
        d.add(vaddr, crc, size)
    return d


def test_written_pages_are_the_changed_and_new_ones_small_mappings_first() -> None:
    big, small = 8 << 20, 1 << 20
    before = {1: _digests([(0x1000, 1, small), (0x2000, 2, small), (0x9000, 3, big)])}
    after = {
        1: _digests([(0x1000, 1, small), (0x2000, 5, small), (0x3000, 6, small), (0x9000, 4, big)]),
        2: _digests([(0x5000, 7, small)]),  # a task that appeared
    }
    assert written_pages(before, after, limit=10) == {1: [0x2000, 0x3000, 0x9000], 2: [0x5000]}
    # Beyond the limit the big mapping's page is the one left out.
    assert written_pages(before, after, limit=3) == {1: [0x2000, 0x3000], 2: [0x5000]}
    assert written_pages(before, before, limit=10) == {}
    assert written_pages(before, after, limit=0) == {}


def test_pages_this_process_writes_are_found() -> None:
    me = os.getpid()
    # A mapping of its own (a flag of its own keeps the kernel from merging it with its
    # neighbours): the test process's heap may be larger than a bulk mapping.
    buf = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_DONTFORK)
    try:
        for i in range(64):
            buf[i * 4096] = 1  # resident
        before = page_digests(me)
        buf[10 * 4096 + 7] = 0xFF
        after = page_digests(me)
        written = {
            v for vaddrs in written_pages(before, after, limit=100_000).values() for v in vaddrs
        }
        view = (ctypes.c_char * len(buf)).from_buffer(buf)
        target = ctypes.addressof(view) + 10 * 4096
        del view
        assert target in written
        assert len(after) == 1
        assert sum(len(d) for d in after.values()) > 64
    finally:
        buf.close()


def test_a_bulk_mapping_is_never_the_working_set() -> None:
    bulk = BULK_MAPPING_BYTES
    before = {1: _digests([(0x1000, 1, bulk), (0x2000, 2, 4096 * 8)])}
    after = {1: _digests([(0x1000, 9, bulk), (0x2000, 3, 4096 * 8)])}
    assert written_pages(before, after, limit=10) == {1: [0x2000]}


def test_a_process_in_a_nested_namespace_keeps_its_container_pid(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    # 4001 started a namespace of its own inside the container: one more NSpid level.
    (proc / "4001" / "task" / "4001" / "children").write_text("4002")
    d = proc / "4002"
    (d / "task" / "4002").mkdir(parents=True)
    (d / "task" / "4002" / "children").write_text("")
    (d / "status").write_text("Name:\tsh\nNSpid:\t4002\t9\t1\n")
    assert process_tree(4000, proc=proc) == {4000: 1, 4001: 7, 4002: 9}
