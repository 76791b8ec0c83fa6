"""The migration record: totals derived as the paper defines them, JSON and CSV round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.migration.record import MigrationRecord, Round, load_record, save_record


def _record() -> MigrationRecord:
    return MigrationRecord(
        migration_id="m1",
        service="s",
        source="gw1",
        destination="gw2",
        technique="hybrid",
        pre_dump_time_s=0.5,
        pre_dump_transfer_time_s=10.0,
        dump_time_s=0.2,
        dump_transfer_time_s=0.3,
        resume_time_s=0.4,
        faulted_pages_transfer_time_s=2.0,
        pre_dump_bytes=100,
        dump_bytes=10,
        faulted_pages_bytes=5,
        rounds=[
            Round(
                index=0,
                dump_time_s=0.5,
                freeze_time_s=0.1,
                transfer_time_s=10.0,
                bytes_dumped=100,
                bytes_sent=100,
            ),
        ],
    )


def test_totals_follow_the_paper() -> None:
    r = _record()
    assert r.downtime_s == pytest.approx(0.2 + 0.3 + 0.4)
    assert r.total_time_s == pytest.approx(0.5 + 10.0 + 0.2 + 0.3 + 0.4 + 2.0)
    assert r.transferred_bytes == 115


def test_json_and_csv(tmp_path: Path) -> None:
    r = _record()
    r.outcome = Outcome.COMPLETED
    r.mark("dumping", 1.0)
    path = save_record(r, tmp_path)
    again = load_record(path)
    assert again.total_time_s == r.total_time_s
    assert again.rounds == r.rounds
    r2 = r.model_copy(update={"migration_id": "m2"})
    save_record(r2, tmp_path)
    lines = (tmp_path / "migrations.csv").read_text().splitlines()
    assert len(lines) == 3
    assert "downtime_s" in lines[0]
