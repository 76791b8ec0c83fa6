"""What a service touched, per mapping: smaps parsing and the container's process tree."""

from __future__ import annotations

from pathlib import Path

from fogmig.platform.runtime.access import (
    Region,
    accessed_regions,
    clear_accessed,
    parse_smaps,
    process_tree,
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
