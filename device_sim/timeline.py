"""A device's request timeline: outage detection, observed downtime, percentiles and the CSV.

Everything here works on :class:`RequestRecord` values only, so the live device and an
offline analysis of a timeline CSV find the same outages.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Final

from fogmig.device_sim.events import Outage, RequestKind, RequestOutcome, RequestRecord
from fogmig.platform.base.errors import ConfigError

CSV_FIELDS: Final = (
    "device",
    "request",
    "seq",
    "attempt",
    "service",
    "gateway",
    "address",
    "port",
    "sent_at",
    "latency_ms",
    "outcome",
    "code",
    "applied",
    "detail",
)


def default_gap_s(interval_s: float) -> float:
    """Good answers further apart than this make an outage even without a failed request.

    A reading's answer may be late rather than missing (CoAP retransmits a confirmable
    request until the service is back): a missed beat is two intervals, and half a second of
    slack keeps the jitter of short intervals out.
    """
    return max(2 * interval_s, interval_s + 0.5)


class OutageTracker:
    """Follows one device's readings and reports each outage when its first good answer comes.

    An outage is a stretch between two good answers that held at least one failed request, or
    that lasted longer than ``gap_s``. Its downtime is the time from the last good answer
    before it to the first good answer after it, as the device saw it.
    """

    def __init__(self, *, gap_s: float) -> None:
        if not gap_s > 0:
            raise ConfigError(f"the outage gap must be positive, got {gap_s}")
        self.gap_s = gap_s
        self._last_ok: RequestRecord | None = None
        self._failed = 0

    def observe(self, record: RequestRecord) -> Outage | None:
        if record.request is not RequestKind.POST:
            return None
        if not record.ok:
            self._failed += 1
            return None
        answered = record.answered_at
        assert answered is not None
        previous, failed = self._last_ok, self._failed
        self._last_ok, self._failed = record, 0
        if previous is None:
            return None
        before = previous.answered_at
        assert before is not None
        if failed == 0 and answered - before <= self.gap_s:
            return None
        return Outage(
            device=record.device,
            service=record.service,
            last_ok_at=before,
            first_ok_at=answered,
            failed=failed,
            gateway_before=previous.gateway,
            gateway_after=record.gateway,
        )


def detect_outages(records: Iterable[RequestRecord], *, gap_s: float) -> list[Outage]:
    """Every outage of every device in ``records`` (in time order per device)."""
    trackers: dict[str, OutageTracker] = {}
    found = []
    for record in records:
        tracker = trackers.setdefault(record.device, OutageTracker(gap_s=gap_s))
        outage = tracker.observe(record)
        if outage is not None:
            found.append(outage)
    return found


def observed_downtime(
    records: Iterable[RequestRecord], *, start: float, end: float
) -> float | None:
    """The longest time without a good answer that overlaps ``[start, end]``.

    For a migration window this is the device's downtime: from the last good answer before
    the service stopped answering to the first good answer after. Without any disruption it
    is simply the spacing of the readings. None when no good answer came after ``start``.
    """
    answered = sorted(
        r.answered_at
        for r in records
        if r.request is RequestKind.POST and r.ok and r.answered_at is not None
    )
    best: float | None = None
    for before, after in itertools.pairwise(answered):
        if before <= end and after >= start:
            best = max(best or 0.0, after - before)
    return best


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- CSV -------------------------------------------------------------------------------------


def csv_row(record: RequestRecord) -> dict[str, object]:
    return {
        "device": record.device,
        "request": record.request.value,
        "seq": "" if record.seq is None else record.seq,
        "attempt": record.attempt,
        "service": record.service,
        "gateway": record.gateway,
        "address": record.address,
        "port": record.port,
        "sent_at": f"{record.sent_at:.6f}",
        "latency_ms": f"{record.latency_s * 1000:.3f}",
        "outcome": record.outcome.value,
        "code": record.code,
        "applied": "" if record.applied is None else str(record.applied).lower(),
        "detail": record.detail,
    }


def _parse_row(row: dict[str, str]) -> RequestRecord:
    applied = {"": None, "true": True, "false": False}[row["applied"]]
    return RequestRecord(
        device=row["device"],
        request=RequestKind(row["request"]),
        seq=int(row["seq"]) if row["seq"] else None,
        attempt=int(row["attempt"]),
        service=row["service"],
        gateway=row["gateway"],
        address=row["address"],
        port=int(row["port"]),
        sent_at=float(row["sent_at"]),
        latency_s=float(row["latency_ms"]) / 1000,
        outcome=RequestOutcome(row["outcome"]),
        code=row["code"],
        applied=applied,
        detail=row["detail"],
    )


def read_timeline(path: Path) -> list[RequestRecord]:
    """The requests of a timeline CSV written by :class:`TimelineWriter`."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ConfigError(f"{path} is not a device timeline (columns {reader.fieldnames})")
        try:
            return [_parse_row(row) for row in reader]
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{path}: malformed timeline row: {exc}") from exc


class TimelineWriter:
    """Appends one CSV row per request and flushes it, so a crash keeps what was measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = path.open("w", newline="")
        self._csv = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS)
        self._csv.writeheader()
        self.rows = 0

    def write(self, record: RequestRecord) -> None:
        if self._fh is None:
            raise ConfigError(f"the timeline {self.path} is closed")
        self._csv.writerow(csv_row(record))
        self._fh.flush()
        self.rows += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
