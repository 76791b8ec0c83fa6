"""The migration record: totals derived as the paper defines them, JSON and CSV round trips."""

from __future__ import annotations

import csv
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


def test_device_observed_figures_are_absent_until_a_probe_ran(tmp_path: Path) -> None:
    r = _record()
    assert r.device_downtime_s is None
    assert (r.probe_rate_hz, r.probe_sent, r.probe_answered, r.probe_lost) == (None,) * 4
    save_record(r, tmp_path)
    probed = r.model_copy(
        update={
            "migration_id": "m2",
            "device_downtime_s": 0.85,
            "probe_rate_hz": 20.0,
            "probe_sent": 30,
            "probe_answered": 12,
            "probe_lost": 18,
        }
    )
    save_record(probed, tmp_path)
    assert load_record(tmp_path / "m2.json").device_downtime_s == pytest.approx(0.85)
    with (tmp_path / "migrations.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["device_downtime_s"] for row in rows] == ["", "0.85"]
    assert [row["probe_lost"] for row in rows] == ["", "18"]
    assert rows[1]["probe_rate_hz"] == "20.0"
    assert rows[1]["probe_sent"] == "30"
    assert rows[1]["probe_answered"] == "12"
    assert rows[1]["downtime_s"] == rows[0]["downtime_s"]


def test_a_csv_with_other_columns_is_kept_aside(tmp_path: Path) -> None:
    old = "migration_id,service,downtime_s\nm0,s,1.0\n"
    (tmp_path / "migrations.csv").write_text(old)
    save_record(_record(), tmp_path)
    (aside,) = tmp_path.glob("migrations-*.csv")
    assert aside.read_text() == old
    header, row = (tmp_path / "migrations.csv").read_text().splitlines()
    assert header.startswith("migration_id,service,source,")
    assert row.startswith("m1,s,gw1,")


def test_compression_ratio_and_rates() -> None:
    r = _record()
    assert r.compression_ratio == 1.0
    assert r.bulk_rate_bytes_per_s == 0.0
    r.sent_file_bytes, r.sent_wire_bytes = 1000, 400
    r.bulk_file_bytes, r.bulk_wire_bytes, r.bulk_seconds = 900, 300, 2.0
    assert r.compression_ratio == pytest.approx(2.5)
    assert r.bulk_rate_bytes_per_s == pytest.approx(150.0)
    assert r.bulk_goodput_bytes_per_s == pytest.approx(450.0)
    one = Round(
        index=0,
        dump_time_s=0.1,
        transfer_time_s=1.0,
        bytes_dumped=10,
        bytes_sent=50,
        file_bytes=200,
        freeze_time_s=0.0,
    )
    assert one.compression_ratio == pytest.approx(4.0)
    back = MigrationRecord.model_validate_json(r.to_json())
    assert back.compression_ratio == pytest.approx(2.5)
    assert "compression_ratio" in r.csv_row()
