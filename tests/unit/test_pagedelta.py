"""The page delta on synthetic CRIU dumps: what it ships, how it rebuilds, what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogmig.platform.base.vocabulary import PAGE_SIZE
from fogmig.platform.migration.delta.apply import (
    apply_delta,
)
from fogmig.platform.migration.delta.compute import (
    compute_delta,
)
from fogmig.platform.migration.delta.layout import (
    MANIFEST_NAME,
    DeltaError,
    read_manifest,
    read_runs,
    runs_of,
)
from fogmig.platform.migration.delta.link import apply_delta_linked
from fogmig.platform.migration.delta.save import (
    save_delta,
    write_delta,
)
from fogmig.platform.runtime.pagemap import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    PagemapEntry,
    load_pages,
    read_pagemaps,
    write_pagemap,
)

ANON = PE_LAZY | PE_PRESENT  # what CRIU writes for private anonymous memory
STACK = PE_PRESENT  # stack, vdso, file-backed COW pages: never lazy

Pages = dict[int, tuple[int, bytes]]  # vaddr -> (flags, 4 KiB)


def page(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()


def write_map(d: Path, image_id: str, pages_id: int, pages: Pages, split: int = 1024) -> None:
    """Write a pagemap and its pages file; runs are cut every ``split`` pages."""
    entries: list[PagemapEntry] = []
    data = bytearray()
    run: list[int] = []

    def flush() -> None:
        if run:
            entries.append(PagemapEntry(run[0], len(run), pages[run[0]][0]))
            run.clear()

    for v in sorted(pages):
        flags, content = pages[v]
        if run and (v != run[-1] + PAGE_SIZE or flags != pages[run[0]][0] or len(run) == split):
            flush()
        run.append(v)
        data += content
    flush()
    write_pagemap(d, Pagemap(image_id, pages_id, tuple(entries)))
    (d / f"pages-{pages_id}.img").write_bytes(bytes(data))


def make_dump(
    d: Path, maps: dict[str, tuple[int, Pages]], *, split: int = 1024, tag: str = ""
) -> Path:
    d.mkdir(parents=True)
    for image_id, (pages_id, pages) in maps.items():
        write_map(d, image_id, pages_id, pages, split)
    (d / "core-1.img").write_bytes(b"core" + tag.encode())
    (d / "descriptors.json").write_text(json.dumps(["/dev/null", tag]))
    (d / "dump.log").write_text("criu's own log, not an image\n")
    return d


def contents(d: Path) -> dict[str, dict[int, bytes]]:
    """Every present page of a dump directory by pagemap and vaddr."""
    out: dict[str, dict[int, bytes]] = {}
    for image_id, pm in read_pagemaps(d).items():
        pages = load_pages(d, pm)
        out[image_id] = {int(v): pages[i].tobytes() for i, v in enumerate(pm.present_vaddrs())}
    return out


def assert_same_dump(rebuilt: Path, final: Path) -> None:
    for p in final.iterdir():
        if p.suffix == ".log":
            assert not (rebuilt / p.name).exists()
            continue
        assert (rebuilt / p.name).read_bytes() == p.read_bytes(), p.name
    assert {p.name for p in rebuilt.iterdir()} == {
        p.name for p in final.iterdir() if p.suffix != ".log"
    }


HEAP = 0x5600_0000_0000
STACK_TOP = 0x7FFC_0000_0000


def base_pages(n: int = 40) -> Pages:
    pages: Pages = {HEAP + i * PAGE_SIZE: (ANON, page(i)) for i in range(n)}
    pages[STACK_TOP] = (STACK, page(1000))
    pages[STACK_TOP + PAGE_SIZE] = (STACK, page(1001))
    return pages


def test_changed_new_and_vanished_pages(tmp_path: Path) -> None:
    prev = base_pages()
    cur = dict(prev)
    cur[HEAP + 3 * PAGE_SIZE] = (ANON, page(5003))  # changed
    cur[HEAP + 39 * PAGE_SIZE] = (ANON, page(5039))  # changed, last of its run
    cur[STACK_TOP] = (STACK, page(6000))  # changed, not lazy
    cur[HEAP + 60 * PAGE_SIZE] = (ANON, page(5060))  # new, after a gap
    del cur[HEAP + 10 * PAGE_SIZE]  # vanished (MADV_DONTNEED)
    del cur[HEAP + 11 * PAGE_SIZE]
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, cur)}, tag="2")

    delta = compute_delta(d1, d2)
    s = delta.stats
    assert (s.pages_total, s.pages_changed, s.pages_new, s.pages_gone) == (41, 3, 1, 2)
    assert s.bytes_shipped == 4 * PAGE_SIZE
    assert delta.pagemaps[0].shipped_vaddrs().tolist() == [
        HEAP + 3 * PAGE_SIZE,
        HEAP + 39 * PAGE_SIZE,
        HEAP + 60 * PAGE_SIZE,
        STACK_TOP,
    ]

    written = save_delta(delta, tmp_path / "delta")
    assert written.pages_changed == 4
    assert written.bytes == sum(p.stat().st_size for p in (tmp_path / "delta").iterdir())
    assert written.bytes < 6 * PAGE_SIZE  # the 4 pages plus small files, not the 41
    assert not any(p.name.startswith("pages-") for p in (tmp_path / "delta").iterdir())
    assert not (tmp_path / "delta" / "dump.log").exists()

    rebuilt = apply_delta(d1, tmp_path / "delta", tmp_path / "r2")
    assert (rebuilt.pages_from_delta, rebuilt.pages_from_base) == (4, 37)
    assert rebuilt.bytes_written == 41 * PAGE_SIZE
    assert_same_dump(tmp_path / "r2", d2)
    assert HEAP + 10 * PAGE_SIZE not in contents(tmp_path / "r2")["1"]


def test_identical_rounds_ship_no_pages(tmp_path: Path) -> None:
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    d2 = make_dump(tmp_path / "d2", {"1": (2, base_pages())}, tag="x")
    w = write_delta(d1, d2, tmp_path / "delta")
    assert w.pages_changed == 0
    assert w.pages_total == 42
    apply_delta(d1, tmp_path / "delta", tmp_path / "r")
    assert_same_dump(tmp_path / "r", d2)


def test_heap_growth_shifts_offsets_and_entries_split_differently(tmp_path: Path) -> None:
    prev = base_pages(30)
    # The heap grew below and above: every page keeps its vaddr but its file offset moves.
    cur = {HEAP - 5 * PAGE_SIZE + i * PAGE_SIZE: (ANON, page(7000 + i)) for i in range(5)}
    cur.update(prev)
    cur.update({HEAP + (30 + i) * PAGE_SIZE: (ANON, page(8000 + i)) for i in range(8)})
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)}, split=7)
    d2 = make_dump(tmp_path / "d2", {"1": (2, cur)}, split=4)
    delta = compute_delta(d1, d2)
    assert (delta.stats.pages_changed, delta.stats.pages_new) == (0, 13)
    save_delta(delta, tmp_path / "delta")
    apply_delta(d1, tmp_path / "delta", tmp_path / "r")
    assert_same_dump(tmp_path / "r", d2)


def test_several_pagemaps_and_renumbered_pages_files(tmp_path: Path) -> None:
    shm = {i * PAGE_SIZE: (PE_PRESENT, page(900 + i)) for i in range(16)}
    shm2 = dict(shm)
    shm2[5 * PAGE_SIZE] = (PE_PRESENT, page(1))
    child = {HEAP: (ANON, page(77))}
    d1 = make_dump(tmp_path / "d1", {"shmem-5": (1, shm), "1": (2, base_pages())})
    # A child process appears; the pages files are numbered differently this time.
    d2 = make_dump(
        tmp_path / "d2",
        {"shmem-5": (3, shm2), "1": (1, base_pages()), "2": (2, child)},
        tag="2",
    )
    delta = compute_delta(d1, d2)
    by_id = {d.pagemap.image_id: d for d in delta.pagemaps}
    assert by_id["shmem-5"].shipped_vaddrs().tolist() == [5 * PAGE_SIZE]
    assert by_id["1"].shipped.size == 0
    assert by_id["2"].pages_new == 1
    save_delta(delta, tmp_path / "delta")
    apply_delta(d1, tmp_path / "delta", tmp_path / "r")
    assert_same_dump(tmp_path / "r", d2)


def write_unsorted(d: Path, runs: list[tuple[int, int]], seed_of: dict[int, int]) -> None:
    """A pagemap whose entries are not in address order (CRIU's are; the delta must not care)."""
    d.mkdir()
    entries = [PagemapEntry(v, n, ANON) for v, n in runs]
    write_pagemap(d, Pagemap("1", 2, tuple(entries)))
    data = b"".join(page(seed_of[v + i * PAGE_SIZE]) for v, n in runs for i in range(n))
    (d / "pages-2.img").write_bytes(data)


def test_page_order_in_the_files_does_not_matter(tmp_path: Path) -> None:
    seeds = {HEAP + i * PAGE_SIZE: i for i in range(12)}
    # Previous round: three runs stored last-first, so its file order is not vaddr order.
    write_unsorted(
        tmp_path / "d1",
        [(HEAP + 8 * PAGE_SIZE, 4), (HEAP + 4 * PAGE_SIZE, 4), (HEAP, 4)],
        seeds,
    )
    changed = dict(seeds)
    changed[HEAP + 5 * PAGE_SIZE] = 99
    write_unsorted(tmp_path / "d2", [(HEAP + 6 * PAGE_SIZE, 6), (HEAP, 6)], changed)
    delta = compute_delta(tmp_path / "d1", tmp_path / "d2")
    assert delta.pagemaps[0].shipped_vaddrs().tolist() == [HEAP + 5 * PAGE_SIZE]
    save_delta(delta, tmp_path / "delta")
    apply_delta(tmp_path / "d1", tmp_path / "delta", tmp_path / "r")
    assert_same_dump(tmp_path / "r", tmp_path / "d2")
    # Swapped single pages: the file positions span a run but are not one.
    p = PAGE_SIZE
    swapped = [(HEAP, 1), (HEAP + 2 * p, 1), (HEAP + p, 1), (HEAP + 3 * p, 1)]
    write_unsorted(tmp_path / "d3", swapped, seeds)
    write_unsorted(tmp_path / "d4", [(HEAP, 4)], seeds)
    assert compute_delta(tmp_path / "d3", tmp_path / "d4").stats.pages_shipped == 0


def test_first_round_ships_everything_and_needs_no_base(tmp_path: Path) -> None:
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    w = write_delta(None, d1, tmp_path / "delta")
    assert w.pages_changed == w.pages_total == 42
    assert read_manifest(tmp_path / "delta").pagemaps[0].base_pagemap_sha256 is None
    stats = apply_delta(None, tmp_path / "delta", tmp_path / "r")
    assert stats.pages_from_base == 0
    assert_same_dump(tmp_path / "r", d1)


def test_rounds_chain_onto_rebuilt_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pages = base_pages(64)
    dumps = [make_dump(tmp_path / "d0", {"1": (2, pages)})]
    for r in range(1, 4):
        pages = dict(pages)
        for i in rng.choice(64, size=6, replace=False):
            pages[HEAP + int(i) * PAGE_SIZE] = (ANON, page(10_000 * r + int(i)))
        dumps.append(make_dump(tmp_path / f"d{r}", {"1": (2, pages)}, tag=str(r)))
    base: Path | None = None
    for r, d in enumerate(dumps):
        prev = dumps[r - 1] if r else None
        write_delta(prev, d, tmp_path / f"delta{r}")
        apply_delta(base, tmp_path / f"delta{r}", tmp_path / f"r{r}")
        base = tmp_path / f"r{r}"
    assert_same_dump(tmp_path / "r3", dumps[3])


def test_refuses_a_base_that_is_not_the_previous_round(tmp_path: Path) -> None:
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    other = dict(base_pages())
    del other[HEAP]
    d0 = make_dump(tmp_path / "d0", {"1": (2, other)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, base_pages())})
    write_delta(d1, d2, tmp_path / "delta")
    with pytest.raises(DeltaError, match="not the round this delta was computed against"):
        apply_delta(d0, tmp_path / "delta", tmp_path / "r")
    with pytest.raises(DeltaError, match="needs a base"):
        apply_delta(None, tmp_path / "delta", tmp_path / "r2")


def test_a_corrupted_base_page_is_caught_by_the_digest(tmp_path: Path) -> None:
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    d2 = make_dump(tmp_path / "d2", {"1": (2, base_pages())})
    write_delta(d1, d2, tmp_path / "delta")
    with (d1 / "pages-2.img").open("r+b") as f:
        f.seek(7 * PAGE_SIZE + 100)
        f.write(b"\xff\xfe")
    with pytest.raises(DeltaError, match="SHA-256 mismatch"):
        apply_delta(d1, tmp_path / "delta", tmp_path / "r")


def test_without_digest_a_missing_base_page_is_still_refused(tmp_path: Path) -> None:
    prev = base_pages()
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, prev)})
    write_delta(d1, d2, tmp_path / "delta", digest=False)
    assert read_manifest(tmp_path / "delta").pagemaps[0].pages_sha256 is None
    # Forge a base with the same pagemap bytes but a short pages file.
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "pagemap-1.img").write_bytes((d1 / "pagemap-1.img").read_bytes())
    (forged / "pages-2.img").write_bytes(b"\0" * PAGE_SIZE)
    with pytest.raises(DeltaError, match="present pages"):
        apply_delta(forged, tmp_path / "delta", tmp_path / "r")


def test_manifest_names_cannot_leave_the_directory(tmp_path: Path) -> None:
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    write_delta(None, d1, tmp_path / "delta")
    m = json.loads((tmp_path / "delta" / MANIFEST_NAME).read_text())
    m["files"].append("../../etc/passwd")
    (tmp_path / "delta" / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(DeltaError, match="not a plain file name"):
        apply_delta(None, tmp_path / "delta", tmp_path / "r")


def test_refuses_non_empty_output_and_non_dumps(tmp_path: Path) -> None:
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(DeltaError, match="not empty"):
        write_delta(None, d1, tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltaError, match="no pagemap"):
        compute_delta(None, tmp_path / "empty")
    with pytest.raises(DeltaError, match="not a page delta"):
        apply_delta(None, tmp_path / "empty", tmp_path / "r")


@pytest.mark.parametrize(
    ("flags", "message"),
    [(PE_LAZY, "is a lazy dump"), (PE_PARENT, "takes pages from parent images")],
)
def test_refuses_dumps_without_page_contents(tmp_path: Path, flags: int, message: str) -> None:
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    d2 = tmp_path / "d2"
    d2.mkdir()
    entries = (PagemapEntry(HEAP, 4, flags), PagemapEntry(STACK_TOP, 1, PE_PRESENT))
    write_pagemap(d2, Pagemap("1", 2, entries))
    (d2 / "pages-2.img").write_bytes(page(1))
    with pytest.raises(DeltaError, match=message):
        compute_delta(d1, d2)
    with pytest.raises(DeltaError, match=message):
        compute_delta(d2, d1)


def test_runs_file_round_trip_and_damage(tmp_path: Path) -> None:
    v = np.array([0x1000, 0x2000, 0x3000, 0x9000, 0xB000], dtype=np.int64)
    runs = runs_of(v)
    assert runs["vaddr"].tolist() == [0x1000, 0x9000, 0xB000]
    assert runs["nr_pages"].tolist() == [3, 1, 1]
    d1 = make_dump(tmp_path / "d1", {"1": (2, base_pages())})
    write_delta(None, d1, tmp_path / "delta")
    path = tmp_path / "delta" / "delta-pages-1.img"
    back = read_runs(path)
    assert back.pages is not None
    assert back.vaddrs.tolist() == sorted(base_pages())
    assert back.pages[0].tobytes() == page(0)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(DeltaError, match="truncated"):
        read_runs(path)
    path.write_bytes(b"NOTRUNS!" + data[8:])
    with pytest.raises(DeltaError, match="not a page runs file"):
        read_runs(path)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=st.dictionaries(st.integers(0, 80), st.integers(0, 3), max_size=60),
    after=st.dictionaries(st.integers(0, 80), st.integers(0, 3), max_size=60),
    split_a=st.integers(1, 9),
    split_b=st.integers(1, 9),
)
def test_any_two_rounds_rebuild_byte_identical(
    tmp_path_factory: pytest.TempPathFactory,
    before: dict[int, int],
    after: dict[int, int],
    split_a: int,
    split_b: int,
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    prev: Pages = {HEAP + i * PAGE_SIZE: (ANON, page(s * 100 + i)) for i, s in before.items()}
    cur: Pages = {HEAP + i * PAGE_SIZE: (ANON, page(s * 100 + i)) for i, s in after.items()}
    d1 = make_dump(tmp / "d1", {"1": (2, prev)}, split=split_a)
    d2 = make_dump(tmp / "d2", {"1": (2, cur)}, split=split_b)
    w = write_delta(d1, d2, tmp / "delta")
    expected = {v for v in cur if v not in prev or prev[v][1] != cur[v][1]}
    assert w.pages_changed == len(expected)
    apply_delta(d1, tmp / "delta", tmp / "r")
    assert_same_dump(tmp / "r", d2)


# --- byte-level deltas: XOR against the base, compressed --------------------------------------


def _touched(content: bytes, offsets: list[int], value: int) -> bytes:
    b = bytearray(content)
    for off in offsets:
        b[off % PAGE_SIZE] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("change", "max_bytes_per_page", "expect_xor"),
    [
        # The service's writer: 8 bytes per page.
        ("sparse", 64, True),
        # A third of every page zeroed: still XOR, and still smaller than the page.
        ("dense", 3 * PAGE_SIZE // 4, True),
        # Fresh random pages: nothing to gain, raw, stored uncompressed.
        ("random", PAGE_SIZE + 64, False),
    ],
)
def test_changed_pages_travel_as_compressed_xor_and_rebuild_identical(
    tmp_path: Path, change: str, max_bytes_per_page: int, expect_xor: bool
) -> None:
    rng = np.random.default_rng(7)
    prev = base_pages(300)
    cur = dict(prev)
    changed = [HEAP + i * PAGE_SIZE for i in range(0, 300, 3)]
    for n, v in enumerate(changed):
        flags, content = prev[v]
        if change == "sparse":
            cur[v] = (flags, _touched(content, [n * 8 + k for k in range(8)], n % 255 + 1))
        elif change == "dense":
            cur[v] = (flags, _touched(content, rng.integers(0, PAGE_SIZE, 2048).tolist(), 0))
        else:
            cur[v] = (flags, page(50_000 + n))
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, cur)})
    w = write_delta(d1, d2, tmp_path / "delta")
    assert w.pages_changed == len(changed)
    m = w.manifest
    assert (m.pages_xor == len(changed)) is expect_xor
    assert m.page_bytes_plain == len(changed) * PAGE_SIZE
    assert m.page_bytes_stored <= len(changed) * max_bytes_per_page
    apply_delta(d1, tmp_path / "delta", tmp_path / "r")
    assert_same_dump(tmp_path / "r", d2)


def test_a_page_turned_to_zeros_goes_raw_and_compresses(tmp_path: Path) -> None:
    prev = base_pages(20)
    cur = dict(prev)
    cur[HEAP] = (ANON, bytes(PAGE_SIZE))
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, cur)})
    w = write_delta(d1, d2, tmp_path / "delta")
    assert w.manifest.pages_xor == 0
    assert w.manifest.page_bytes_stored < 100
    apply_delta(d1, tmp_path / "delta", tmp_path / "r")
    assert_same_dump(tmp_path / "r", d2)


def test_a_xor_delta_applied_on_the_wrong_base_is_refused(tmp_path: Path) -> None:
    prev = base_pages(20)
    cur = dict(prev)
    cur[HEAP] = (ANON, _touched(prev[HEAP][1], [1, 2, 3], 9))
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, cur)})
    write_delta(d1, d2, tmp_path / "delta")
    other = dict(prev)
    other[HEAP] = (ANON, page(4242))
    # Same pagemap, other contents: only the digest of the rebuilt pages can tell.
    d0 = make_dump(tmp_path / "d0", {"1": (2, other)})
    with pytest.raises(DeltaError, match="SHA-256"):
        apply_delta(d0, tmp_path / "delta", tmp_path / "r")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**9), st.integers(0, 7))
def test_corrupted_page_sections_are_refused(flip: int, bit: int) -> None:
    """Any flipped bit in a runs file is refused or caught by the rebuild's digest; it never
    rebuilds a different image silently."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prev = base_pages(64)
        cur = dict(prev)
        for i in range(0, 64, 2):
            v = HEAP + i * PAGE_SIZE
            cur[v] = (ANON, _touched(prev[v][1], [i * 8 + k for k in range(8)], i + 1))
        d1 = make_dump(root / "d1", {"1": (2, prev)})
        d2 = make_dump(root / "d2", {"1": (2, cur)})
        write_delta(d1, d2, root / "delta")
        path = root / "delta" / "delta-pages-1.img"
        data = bytearray(path.read_bytes())
        data[flip % len(data)] ^= 1 << bit
        path.write_bytes(bytes(data))
        try:
            apply_delta(d1, root / "delta", root / "r")
        except DeltaError:
            return
        assert_same_dump(root / "r", d2)


def resolved(d: Path) -> dict[str, dict[int, bytes]]:
    """Every page of a dump directory, following CRIU's ``parent`` link for pages in parent."""
    out: dict[str, dict[int, bytes]] = {}
    parent = contents(d / "parent") if (d / "parent").exists() else {}
    for image_id, pm in read_pagemaps(d).items():
        pages = load_pages(d, pm)
        own = {int(v): pages[i].tobytes() for i, v in enumerate(pm.present_vaddrs())}
        for e in pm.entries:
            for k in range(e.nr_pages if e.flags & PE_PARENT else 0):
                v = e.vaddr + k * PAGE_SIZE
                own[v] = parent[image_id][v]
        out[image_id] = own
    return out


def test_the_final_image_can_build_on_the_last_round_through_a_parent_link(
    tmp_path: Path,
) -> None:
    prev = base_pages()
    cur = dict(prev)
    cur[HEAP + 3 * PAGE_SIZE] = (ANON, _touched(prev[HEAP + 3 * PAGE_SIZE][1], [8], 7))  # xor
    cur[STACK_TOP] = (STACK, page(6000))  # changed, raw
    cur[HEAP + 60 * PAGE_SIZE] = (ANON, page(5060))  # new
    del cur[HEAP + 10 * PAGE_SIZE]  # vanished
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, cur)}, tag="2")
    write_delta(d1, d2, tmp_path / "delta", digest=False)

    stats = apply_delta_linked(d1, tmp_path / "delta", tmp_path / "final")
    final = tmp_path / "final"
    assert (stats.pages_from_delta, stats.pages_from_base) == (3, 39)
    assert stats.bytes_written == 3 * PAGE_SIZE  # only the changed pages are written
    assert (final / "parent").is_symlink()
    assert (final / "parent").resolve() == d1.resolve()
    assert resolved(final) == contents(d2)
    flags = {e.vaddr: e.flags for e in read_pagemaps(final)["1"].entries}
    assert flags[HEAP] == PE_LAZY | PE_PARENT  # unchanged run: in the parent
    assert flags[HEAP + 3 * PAGE_SIZE] == ANON  # the changed page: here
    assert (final / "core-1.img").read_bytes() == (d2 / "core-1.img").read_bytes()


def test_a_linked_final_image_refuses_a_page_its_base_lacks(tmp_path: Path) -> None:
    prev = base_pages()
    d1 = make_dump(tmp_path / "d1", {"1": (2, prev)})
    d2 = make_dump(tmp_path / "d2", {"1": (2, dict(prev))}, tag="2")
    write_delta(d1, d2, tmp_path / "delta", digest=False)
    shrunk = dict(prev)
    del shrunk[HEAP]
    other = make_dump(tmp_path / "other", {"1": (2, shrunk)})
    with pytest.raises(DeltaError):
        apply_delta_linked(other, tmp_path / "delta", tmp_path / "final")
