"""CRIU pagemap images: decoding, encoding, page offsets and entry grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.runtime.image import (
    ImageFormatError,
    encode_message,
    write_image,
)
from fogmig.platform.runtime.pagemap import (
    MAX_ENTRY_PAGES,
    PAGEMAP_MAGICS,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    decode_pagemap,
    encode_pagemap,
    entries_from_pages,
    image_id_of,
    is_pages_file,
    load_pages,
    read_pagemap,
    read_pagemaps,
    write_pagemap,
)

# Two records of a pagemap CRIU 4.2.1 wrote on this platform: the head (pages_id 2) and an
# entry (vaddr 0x55cb09f0c000, compat_nr_pages 0, flags PRESENT, nr_pages 1).
REAL_HEAD = bytes.fromhex("0802")
REAL_ENTRY = bytes.fromhex("0880c09691b8b915100020042801")


def test_decodes_what_criu_writes_and_encodes_it_back_identically() -> None:
    data = write_image(PAGEMAP_MAGICS, [REAL_HEAD, REAL_ENTRY])
    pm = decode_pagemap(data, "1")
    assert pm.pages_id == 2
    assert pm.entries == (PagemapEntry(94332550225920, 1, PE_PRESENT),)
    assert pm.pages_file_name == "pages-2.img"
    assert encode_pagemap(pm) == data


def test_old_style_entries_read_as_criu_reads_them() -> None:
    head = encode_message([(1, 7)])
    in_parent = encode_message([(1, 0x1000), (2, 3), (3, 1)])  # in_parent, compat count
    no_flags = encode_message([(1, 0x8000), (2, 2)])
    pm = decode_pagemap(write_image(PAGEMAP_MAGICS, [head, in_parent, no_flags]), "9")
    assert pm.entries == (
        PagemapEntry(0x1000, 3, PE_PARENT),
        PagemapEntry(0x8000, 2, PE_PRESENT),
    )
    assert pm.present_pages == 2


def test_empty_pagemap_has_no_pages_file() -> None:
    pm = decode_pagemap(write_image(PAGEMAP_MAGICS, []), "3")
    assert pm.pages_id is None
    assert pm.pages_file_name is None
    assert pm.present_vaddrs().size == 0
    assert encode_pagemap(pm) == write_image(PAGEMAP_MAGICS, [])


@pytest.mark.parametrize(
    "data",
    [
        write_image((0x54564319, 0x12345678), [REAL_HEAD]),
        write_image(PAGEMAP_MAGICS, [encode_message([(2, 1)])]),
        write_image(PAGEMAP_MAGICS, [REAL_HEAD, encode_message([(1, 0x1001), (5, 1)])]),
        write_image(PAGEMAP_MAGICS, [REAL_HEAD, encode_message([(5, 1)])]),
        b"\x19\x43",
    ],
    ids=["magic", "head-without-pages-id", "unaligned", "no-vaddr", "truncated"],
)
def test_rejects_malformed_pagemaps(data: bytes) -> None:
    with pytest.raises(ImageFormatError):
        decode_pagemap(data, "1")


def test_only_present_entries_take_space_in_the_pages_file() -> None:
    pm = Pagemap(
        "1",
        4,
        (
            PagemapEntry(0x10000, 2, PE_PRESENT | PE_LAZY),
            PagemapEntry(0x20000, 3, PE_PARENT),
            PagemapEntry(0x30000, 1, PE_LAZY),
            PagemapEntry(0x40000, 1, PE_PRESENT),
        ),
    )
    assert pm.present_vaddrs().tolist() == [0x10000, 0x11000, 0x40000]
    assert pm.page_offsets() == {0x10000: 0, 0x11000: PAGE_SIZE, 0x40000: 2 * PAGE_SIZE}
    assert pm.pages_size == 3 * PAGE_SIZE
    assert pm.vaddrs_with(PE_LAZY).tolist() == [0x10000, 0x11000, 0x30000]
    assert pm.all_vaddrs().size == 7


def test_image_ids_follow_the_file_name() -> None:
    assert image_id_of(Path("pagemap-1.img")) == "1"
    assert image_id_of(Path("pagemap-shmem-5.img")) == "shmem-5"
    for bad in ("pages-1.img", "pagemap-.img", "pagemap-1.json"):
        with pytest.raises(ImageFormatError):
            image_id_of(Path(bad))
    assert is_pages_file("pages-12.img")
    assert not is_pages_file("pagemap-12.img")
    assert not is_pages_file("pages-x.img")


def test_reads_every_pagemap_of_a_directory(tmp_path: Path) -> None:
    a = Pagemap("42", 2, (PagemapEntry(0x1000, 1, PE_PRESENT),))
    b = Pagemap("shmem-7", 1, (PagemapEntry(0, 2, PE_PRESENT),))
    write_pagemap(tmp_path, a)
    write_pagemap(tmp_path, b)
    (tmp_path / "pages-1.img").write_bytes(b"\0" * 2 * PAGE_SIZE)
    assert read_pagemaps(tmp_path) == {"42": a, "shmem-7": b}
    assert read_pagemap(tmp_path / "pagemap-42.img") == a
    write_pagemap(tmp_path, Pagemap("43", 2, ()))
    with pytest.raises(ImageFormatError, match=r"both name pages-2\.img"):
        read_pagemaps(tmp_path)


def test_load_pages_checks_the_size_against_the_pagemap(tmp_path: Path) -> None:
    pm = Pagemap("1", 3, (PagemapEntry(0x1000, 2, PE_PRESENT),))
    with pytest.raises(ImageFormatError, match="missing"):
        load_pages(tmp_path, pm)
    (tmp_path / "pages-3.img").write_bytes(b"\1" * PAGE_SIZE)
    with pytest.raises(ImageFormatError, match="2 present pages"):
        load_pages(tmp_path, pm)
    (tmp_path / "pages-3.img").write_bytes(b"\1" * PAGE_SIZE + b"\2" * PAGE_SIZE)
    pages = load_pages(tmp_path, pm)
    assert pages.shape == (2, PAGE_SIZE)
    assert int(pages[1, 0]) == 2


def test_entries_split_at_gaps_flag_changes_and_the_size_cap() -> None:
    v = np.array([0x1000, 0x2000, 0x4000, 0x5000, 0x6000], dtype=np.int64)
    f = np.array([6, 6, 6, 4, 4], dtype=np.int64)
    assert entries_from_pages(v, f) == [
        PagemapEntry(0x1000, 2, 6),
        PagemapEntry(0x4000, 1, 6),
        PagemapEntry(0x5000, 2, 4),
    ]
    n = MAX_ENTRY_PAGES + 5
    long_run = np.arange(n, dtype=np.int64) * PAGE_SIZE + 0x100000
    entries = entries_from_pages(long_run, np.full(n, 4, dtype=np.int64))
    assert [e.nr_pages for e in entries] == [MAX_ENTRY_PAGES, 5]
    assert entries[1].vaddr == 0x100000 + MAX_ENTRY_PAGES * PAGE_SIZE
    assert entries_from_pages(np.empty(0, dtype=np.int64), []) == []
    with pytest.raises(ValueError, match="ascending"):
        entries_from_pages(v[::-1].copy(), f)
