"""Fixtures shared by the unit tests: migrations recorded on the testbed, as grid runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogmig.experiments.grid import CONFIGURATIONS
from fogmig.experiments.store import RunRecord
from fogmig.platform.migration.record import MigrationRecord

EVALUATION_DATA = Path(__file__).parent / "data" / "evaluation"


def recorded_runs() -> list[RunRecord]:
    """Configuration A (one run per technique), C and D (two each), 75 MB of state, as the
    testbed recorded them (the records' own link fields hold the profile's figures)."""
    runs = []
    for path in sorted(EVALUATION_DATA.glob("*/*.json")):
        conf = CONFIGURATIONS[path.parent.name]
        technique, run = path.stem.rsplit("-", 1)
        record = MigrationRecord.model_validate_json(path.read_text())
        runs.append(
            RunRecord(
                engine="fogmig",
                configuration=conf.name,
                paper_configuration=conf.name,
                technique=technique,
                run=int(run),
                state_mb=75,
                dirty_kbps=conf.dirty_kbps,
                link_profile=conf.profile,
                mtu=16000,
                link_rate_asked_mbit=record.link_rate_bit_per_s / 1e6,
                link_rtt_asked_ms=record.link_rtt_s * 1000,
                record=record,
            )
        )
    return runs


@pytest.fixture
def evaluation_runs() -> list[RunRecord]:
    return recorded_runs()
