"""The record of one migration: the paper's nine metrics, totals, rounds, conditions, outcome.

One JSON document per migration and one CSV row per migration (appended), so experiments can be
aggregated. Totals are derived from the components exactly as the paper defines them:
total = every phase time; downtime = dump + dump transfer + resume (section 5.2.2).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, computed_field

from fogmig.platform.base.vocabulary import Outcome, Phase, Technique


class Round(BaseModel):
    """One leave-running pre-copy round (or the final dump, ``final=True``)."""

    model_config = ConfigDict(frozen=True)

    index: int
    final: bool = False
    dump_time_s: float
    freeze_time_s: float = Field(description="how long CRIU kept the service frozen")
    transfer_time_s: float
    bytes_dumped: int = Field(description="size of the full local image of this round")
    bytes_sent: int = Field(description="what crossed the link: all pages, or the changed ones")
    pages_total: int = 0
    pages_changed: int = 0
    file_bytes: int = Field(default=0, description="what the files held before compression")
    rate_bytes_per_s: float = Field(default=0.0, description="bytes on the wire per second")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def compression_ratio(self) -> float:
        """File bytes over wire bytes (1.0: nothing gained, or nothing sent)."""
        return self.file_bytes / self.bytes_sent if self.bytes_sent and self.file_bytes else 1.0


class PhaseTimestamp(BaseModel):
    model_config = ConfigDict(frozen=True)

    phase: Phase
    at: float = Field(description="UNIX time when the phase began")


class MigrationRecord(BaseModel):
    """Everything measured about one migration (JSON on disk, one CSV row)."""

    migration_id: str
    service: str
    source: str
    destination: str
    technique: Technique
    outcome: Outcome = Outcome.RUNNING
    error: str | None = None
    failed_phase: str | None = None
    """The phase the failure happened in (or ``connect``: before the first phase's call)."""
    compression: bool = True
    """Adaptive zstd on the state transfer (per file and chunk, only where it pays)."""

    # The paper's nine metrics.
    pre_dump_time_s: float = 0.0
    pre_dump_transfer_time_s: float = 0.0
    dump_time_s: float = 0.0
    dump_transfer_time_s: float = 0.0
    resume_time_s: float = 0.0
    faulted_pages_transfer_time_s: float = 0.0
    pre_dump_bytes: int = 0
    dump_bytes: int = 0
    faulted_pages_bytes: int = 0
    """What the lazily fetched pages took on the link (compressed where that paid), like
    ``pre_dump_bytes`` and ``dump_bytes``."""

    rounds: list[Round] = Field(default_factory=list)
    precopy_stop_reason: str | None = None
    faulted_pages_remote: int = 0
    faulted_pages_local: int = 0

    # The transfer channel: every directory the migration streamed.
    sent_file_bytes: int = Field(default=0, description="what the streamed files held")
    sent_wire_bytes: int = Field(default=0, description="what crossed the link for them")
    bulk_file_bytes: int = Field(default=0, description="the largest transfer's file bytes")
    bulk_wire_bytes: int = 0
    bulk_seconds: float = 0.0

    # Conditions at decision time.
    state_bytes: int = 0
    dirty_rate_bytes_per_s: float = 0.0
    link_rate_bit_per_s: float = 0.0
    link_rtt_s: float = 0.0

    started_at: float = 0.0
    finished_at: float = 0.0
    phases: list[PhaseTimestamp] = Field(default_factory=list)

    # What a probe device saw from started_at to finished_at; None: no probe ran.
    device_downtime_s: float | None = Field(
        default=None, description="longest gap between the probe's answers, minus its interval"
    )
    probe_rate_hz: float | None = None
    probe_sent: int | None = Field(default=None, description="probe requests sent in the window")
    probe_answered: int | None = None
    probe_lost: int | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_time_s(self) -> float:
        """The paper's total migration time: the sum of every phase of Figure 7."""
        return (
            self.pre_dump_time_s
            + self.pre_dump_transfer_time_s
            + self.dump_time_s
            + self.dump_transfer_time_s
            + self.resume_time_s
            + self.faulted_pages_transfer_time_s
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def downtime_s(self) -> float:
        """The paper's downtime (section 5.2.2): dump + dump transfer + resume."""
        return self.dump_time_s + self.dump_transfer_time_s + self.resume_time_s

    @computed_field  # type: ignore[prop-decorator]
    @property
    def transferred_bytes(self) -> int:
        return self.pre_dump_bytes + self.dump_bytes + self.faulted_pages_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def compression_ratio(self) -> float:
        """File bytes over wire bytes of everything streamed (1.0: nothing gained)."""
        if not self.sent_wire_bytes or not self.sent_file_bytes:
            return 1.0
        return self.sent_file_bytes / self.sent_wire_bytes

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bulk_rate_bytes_per_s(self) -> float:
        """Bytes on the wire per second in the largest transfer: how well it fills the link."""
        return self.bulk_wire_bytes / self.bulk_seconds if self.bulk_seconds > 0 else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bulk_goodput_bytes_per_s(self) -> float:
        """State bytes delivered per second in the largest transfer (compression included)."""
        return self.bulk_file_bytes / self.bulk_seconds if self.bulk_seconds > 0 else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def wall_time_s(self) -> float:
        """Start to finish as a clock saw it (includes control overhead the paper omits)."""
        if self.finished_at <= 0 or self.started_at <= 0:
            return 0.0
        return self.finished_at - self.started_at

    def mark(self, phase: Phase, at: float) -> None:
        self.phases.append(PhaseTimestamp(phase=phase, at=at))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def csv_row(self) -> dict[str, object]:
        d = self.model_dump(exclude={"rounds", "phases"})
        d["rounds"] = len([r for r in self.rounds if not r.final])
        d["phases"] = " ".join(f"{p.phase}@{p.at:.3f}" for p in self.phases)
        return d


def save_record(record: MigrationRecord, directory: Path) -> Path:
    """Write ``<id>.json`` and append a row to ``migrations.csv`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.migration_id}.json"
    path.write_text(record.to_json())
    row = record.csv_row()
    csv_path = directory / "migrations.csv"
    if csv_path.exists():
        with csv_path.open(newline="") as fh:
            header = next(csv.reader(fh), None)
        if header != list(row):
            # Written with other columns (by an older fogmig): kept aside, not misaligned.
            csv_path.replace(directory / f"migrations-{time.strftime('%Y%m%dT%H%M%S')}.csv")
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path


def load_record(path: Path) -> MigrationRecord:
    return MigrationRecord.model_validate(json.loads(path.read_text()))
