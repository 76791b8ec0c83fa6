"""The console table of migration records: the node's and the device's downtime side by side,
with the physical floor of each run (bytes moved / link rate).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from fogmig.platform.migration.record import MigrationRecord


def link_floor_s(record: MigrationRecord) -> float:
    """The time the link needs for the bytes that had to move (the physical floor)."""
    if record.link_rate_bit_per_s <= 0:
        return 0.0
    return record.transferred_bytes * 8 / record.link_rate_bit_per_s


def device_downtime(r: MigrationRecord) -> str:
    """The probe's downtime and how many of its requests the window lost (``-``: no probe,
    ``?``: the probe did not see the service on both sides of the migration)."""
    if r.probe_rate_hz is None:
        return "-"
    seen = "?" if r.device_downtime_s is None else f"{r.device_downtime_s:.2f}"
    return f"{seen} ({r.probe_lost}/{r.probe_sent} lost)"


def summary_table(records: Sequence[MigrationRecord]) -> Table:
    table = Table(title="migrations")
    for col in (
        "technique",
        "total s",
        "downtime s",
        "device downtime s",
        "pre-dump MB",
        "dump MB",
        "faulted MB",
        "floor s",
        "outcome",
    ):
        table.add_column(col)
    for r in records:
        floor = link_floor_s(r)
        table.add_row(
            r.technique,
            f"{r.total_time_s:.2f}",
            f"{r.downtime_s:.2f}",
            device_downtime(r),
            f"{r.pre_dump_bytes / 1e6:.2f}",
            f"{r.dump_bytes / 1e6:.2f}",
            f"{r.faulted_pages_bytes / 1e6:.2f}",
            f"{floor:.2f}",
            r.outcome.value,
        )
    return table
