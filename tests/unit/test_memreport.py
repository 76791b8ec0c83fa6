"""The memory report an agent logs on SIGUSR2: what grew between two looks."""

from __future__ import annotations

import tracemalloc

from fogmig.platform.base.memreport import MemoryWatch, allocator


class Leaky:
    """A type of this test's own, so its count is not disturbed by anything else."""


def test_a_report_names_the_type_that_grew_since_the_last() -> None:
    watch = MemoryWatch(trace=False)
    first = watch.report()
    assert first.grown == []  # nothing to compare with yet
    assert first.objects["Leaky"] == 0
    kept = [Leaky() for _ in range(500)]
    second = watch.report()
    assert second.objects["Leaky"] == 500
    assert ("Leaky", 500) in second.grown
    assert any(line.startswith("grown since the last report: ") for line in second.lines())
    del kept
    third = watch.report()
    assert third.objects["Leaky"] == 0
    assert all(name != "Leaky" for name, _ in third.grown)


def test_the_allocator_figures_add_up_where_glibc_says() -> None:
    info = allocator()
    if info is None:  # not glibc >= 2.33: the report says nothing of it
        return
    assert info.heap >= info.in_use > 0
    assert info.free >= 0


def test_traced_growth_points_at_the_allocating_line() -> None:
    was_tracing = tracemalloc.is_tracing()
    try:
        watch = MemoryWatch(trace=True)
        watch.report()
        blob = [bytes(1000) + bytes([i % 256]) for i in range(2000)]  # about 2 MB here
        report = watch.report()
        assert report.traced_grown, report.lines()
        where, size = report.traced_grown[0]
        assert "test_memreport.py" in where
        assert size > 1_500_000
        assert any(line.startswith("traced growth ") for line in report.lines())
        del blob
    finally:
        if not was_tracing:
            tracemalloc.stop()
