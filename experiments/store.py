"""The grid's raw records on disk: one JSON per run, and every run as ``runs.csv``/``runs.json``.

Layout of an output directory::

    grid.json                                   what the grid runs (``--resume`` reads it)
    records/<engine>/<configuration>/<technique>-<run>.json    one run (RunRecord)
    records/<engine>/<configuration>/<technique>-<run>.probe.csv   the probe device's requests
    runs.csv, runs.json                         every run of every engine, rebuilt at each save

A run's file is written once the run has ended (completed or not), so the files present are the
runs done: an interrupted grid resumes with the cells that have none. Any engine's records (this
platform's, ``fogmig``, or a baseline's) sit side by side under ``records/<engine>/``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogmig.experiments.grid import Cell, GridSpec
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import Outcome
from fogmig.platform.migration.record import MigrationRecord

GRID_FILE: Final = "grid.json"
RECORDS_DIR: Final = "records"
RUNS_CSV: Final = "runs.csv"
RUNS_JSON: Final = "runs.json"


class RunRecord(BaseModel):
    """One run of the grid: where it sat in the grid, the link it ran on, and the migration."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    """Who migrated: ``fogmig`` or a baseline (e.g. ``runc-rsync``)."""
    configuration: str
    """A, B, C, D or a control (``C-mtu1500``)."""
    paper_configuration: str
    technique: str
    run: int = Field(ge=1)
    state_mb: float
    dirty_kbps: float
    link_profile: str
    mtu: int | None = None
    """MTU of the data links during the run (None: not known)."""
    link_rate_asked_mbit: float
    link_rtt_asked_ms: float
    link_rate_measured_mbit: float | None = None
    """TCP throughput measured on the link before the configuration's runs (None: failed)."""
    link_rtt_measured_ms: float | None = None
    leftover_images: int = 0
    """Migration directories found at source or destination before the run (0: fresh)."""
    wall_s: float = 0.0
    """The run from the harness's view: fresh deployment, migration, probe's tail."""
    record: MigrationRecord

    @property
    def cell(self) -> Cell:
        return Cell(configuration=self.configuration, technique=self.technique, run=self.run)

    @property
    def completed(self) -> bool:
        return self.record.outcome is Outcome.COMPLETED

    def csv_row(self) -> dict[str, object]:
        row: dict[str, object] = self.model_dump(exclude={"record"})
        for key, value in self.record.csv_row().items():
            row.setdefault(key, value)
        return row


def run_path(out: Path, engine: str, cell: Cell) -> Path:
    return out / RECORDS_DIR / engine / cell.configuration / f"{cell.technique}-{cell.run}.json"


def probe_path(out: Path, engine: str, cell: Cell) -> Path:
    return run_path(out, engine, cell).with_suffix(".probe.csv")


def write_grid(out: Path, spec: GridSpec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / GRID_FILE).write_text(spec.to_json() + "\n")


def read_grid(out: Path) -> GridSpec:
    path = out / GRID_FILE
    if not path.is_file():
        raise ConfigError(
            f"{out} holds no {GRID_FILE}: it is not the output of a grid",
            hint="--resume takes the --out directory of an earlier `fogmig experiment`",
        )
    return GridSpec.from_json(path.read_text())


def save_run(out: Path, run: RunRecord) -> Path:
    """Write one run's file (atomically), then rebuild ``runs.csv`` and ``runs.json``."""
    path = run_path(out, run.engine, run.cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(run.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    write_tables(out, load_runs(out))
    return path


def load_runs(out: Path) -> list[RunRecord]:
    """Every run of every engine in ``out``, in grid order (unreadable files are errors)."""
    runs = []
    for path in sorted((out / RECORDS_DIR).glob("*/*/*.json")):
        try:
            runs.append(RunRecord.model_validate_json(path.read_text()))
        except ValidationError as exc:
            raise ConfigError(
                f"{path} is not a run record: {exc.error_count()} problem(s)"
            ) from exc
    return sorted(runs, key=lambda r: (r.engine != "fogmig", r.engine, r.cell))


def done_cells(out: Path, engine: str) -> set[Cell]:
    """The cells of ``engine`` with a record: the ones a resumed grid skips."""
    return {r.cell for r in load_runs(out) if r.engine == engine}


def write_tables(out: Path, runs: Iterable[RunRecord]) -> None:
    """``runs.csv`` (one row per run, flat) and ``runs.json`` (every run in full)."""
    runs = list(runs)
    rows = [r.csv_row() for r in runs]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    tmp = out / (RUNS_CSV + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / RUNS_CSV)
    doc = [r.model_dump(mode="json") for r in runs]
    tmp = out / (RUNS_JSON + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out / RUNS_JSON)


def read_csv(out: Path) -> list[dict[str, str]]:
    with (out / RUNS_CSV).open(newline="") as fh:
        return list(csv.DictReader(fh))
