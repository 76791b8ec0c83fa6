"""Predicts the paper's metrics of each migration technique from S, B, RTT and D.

An analytic model of how this platform migrates (runc + CRIU, page-delta pre-copy, CRIU's
lazy-pages daemon), with tunable constants that ``fogmig.policies.calibration`` fits to measured
migrations. Every prediction carries the inputs it was made from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from fogmig.platform.base.vocabulary import PAGE_SIZE, NodeCapabilities, Technique
from fogmig.policies.conditions import (
    InvalidConditionsError,
    LinkConditions,
    PrecopyStopRules,
    ServiceConditions,
    StopReason,
)

GIB = float(1 << 30)


@dataclass(frozen=True, slots=True)
class CostConstants:
    """The platform's fixed costs and rates.

    Defaults come from hand measurements of 20-47 MB services on the reference node kind
    (x86_64, runc 1.1.5, CRIU 4.2.1, a userspace emulated link); ``fit_constants`` replaces
    them with values fitted to the platform's own migration records.
    """

    dump_fixed_s: float = 0.12
    """Per checkpoint: runc and CRIU start-up, freezing, parasite injection."""
    freeze_s_per_gib: float = 1.5
    """Writing memory pages during a checkpoint (the service is frozen meanwhile)."""
    delta_s_per_gib: float = 2.5
    """Reading and comparing page images when there is no soft-dirty tracking."""
    restore_fixed_s: float = 0.15
    restore_s_per_gib: float = 1.5
    """Restoring pages that are present at the destination before the service resumes."""
    rebuild_s_per_gib: float = 2.5
    """Rebuilding the full image set from page deltas at the destination (no native pre-dump)."""
    image_overhead_bytes: int = 16 * 1024
    """Non-memory image files every dump ships (descriptors, cgroup, tmpfs ...)."""
    lazy_dump_bytes: int = 3 << 20
    """Memory a lazy (post-copy) dump still ships eagerly: file-backed COW pages, stack, vdso."""
    lazy_warm_bytes: int = 0
    """What post-copy sends ahead of the freeze, on the wire: a live copy of the service's
    runtime memory (kept pages, heaps, stacks), which spares the restored service its first
    faults. Zero by default, as in the paper's post-copy; fitted to this platform's records
    (the post-copy runs' pre-dump bytes) it is about 6 MB for the sensor service."""
    throughput_efficiency: float = 0.95
    """Share of the measured link throughput a state transfer actually gets."""
    transfer_round_trips: float = 2.0
    """Round trips of fixed cost per state transfer (connection set-up, final acknowledgement)."""
    demand_faults: int = 500
    """Page faults the resumed service takes before the lazy pages have all arrived; each is a
    synchronous round trip to the source's page server."""
    lazy_chunk_bytes: int = 64 * 1024
    """CRIU's background transfer chunk after a fault (uffd.c DEFAULT_XFER_LEN); it grows by
    this much per request while no fault occurs ..."""
    lazy_max_chunk_bytes: int = 4 << 20
    """... up to this (uffd.c MAX_XFER_LEN). One request is outstanding at a time."""
    lazy_resume_round_trips: float = 0.0
    """Round trips a lazy restore makes before the service runs (the destination's lazy-pages
    daemon connecting to the source's page server through the transfer channel). Zero by
    default, which keeps post-copy resuming fastest as in the paper; fitted to this platform's
    records it is about 8 (docs/policy-validation.md)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise InvalidConditionsError(f"cost constant {f.name} must be >= 0, got {value!r}")
        if not 0 < self.throughput_efficiency <= 1:
            raise InvalidConditionsError(
                f"throughput_efficiency must be in (0, 1], got {self.throughput_efficiency!r}"
            )
        if not PAGE_SIZE <= self.lazy_chunk_bytes <= self.lazy_max_chunk_bytes:
            raise InvalidConditionsError(
                "need PAGE_SIZE <= lazy_chunk_bytes <= lazy_max_chunk_bytes, got "
                f"{self.lazy_chunk_bytes} and {self.lazy_max_chunk_bytes}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostConstants:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                values[key] = int(value) if known[key].type in ("int", int) else float(value)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class MigrationComponents:
    """The paper's nine metrics (section 5.1): six times in seconds and three sizes in bytes.

    Downtime follows the paper: dump + dump transfer + resume (section 5.2.2).
    """

    pre_dump_time: float = 0.0
    pre_dump_transfer_time: float = 0.0
    dump_time: float = 0.0
    dump_transfer_time: float = 0.0
    resume_time: float = 0.0
    faulted_pages_transfer_time: float = 0.0
    pre_dump_bytes: int = 0
    dump_bytes: int = 0
    faulted_pages_bytes: int = 0

    @property
    def downtime(self) -> float:
        return self.dump_time + self.dump_transfer_time + self.resume_time

    @property
    def total_time(self) -> float:
        return (
            self.pre_dump_time
            + self.pre_dump_transfer_time
            + self.downtime
            + self.faulted_pages_transfer_time
        )

    @property
    def transferred_bytes(self) -> int:
        return self.pre_dump_bytes + self.dump_bytes + self.faulted_pages_bytes

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["downtime"] = self.downtime
        out["total_time"] = self.total_time
        out["transferred_bytes"] = self.transferred_bytes
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MigrationComponents:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if data.get(f.name) is not None:
                values[f.name] = (
                    int(data[f.name]) if f.name.endswith("_bytes") else float(data[f.name])
                )
        return cls(**values)


@dataclass(frozen=True, slots=True)
class PrecopyRound:
    """One pre-copy round: a checkpoint that leaves the service running, then its transfer."""

    index: int
    bytes: int
    dump_time: float
    transfer_time: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "bytes": self.bytes,
            "dump_time": self.dump_time,
            "transfer_time": self.transfer_time,
        }


@dataclass(frozen=True, slots=True)
class PredictionInputs:
    """Everything a prediction was computed from."""

    service: ServiceConditions
    link: LinkConditions
    native_predump: bool
    stop_rules: PrecopyStopRules
    constants: CostConstants

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service.to_dict(),
            "link": self.link.to_dict(),
            "native_predump": self.native_predump,
            "stop_rules": self.stop_rules.to_dict(),
            "constants": self.constants.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class Prediction:
    """The predicted metrics of one technique, with the pre-copy rounds behind them."""

    technique: Technique
    components: MigrationComponents
    inputs: PredictionInputs
    rounds: tuple[PrecopyRound, ...] = ()
    stop_reason: StopReason | None = None
    lazy_requests: int = 0
    """Round trips the lazy-pages daemon makes (demand faults plus background chunks)."""

    @property
    def downtime(self) -> float:
        return self.components.downtime

    @property
    def total_time(self) -> float:
        return self.components.total_time

    @property
    def transferred_bytes(self) -> int:
        return self.components.transferred_bytes

    @property
    def converged(self) -> bool:
        """Pre-copy ended because the changed pages shrank below the threshold."""
        return self.stop_reason is StopReason.CONVERGED

    def to_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique.value,
            "components": self.components.to_dict(),
            "rounds": [r.to_dict() for r in self.rounds],
            "stop_reason": None if self.stop_reason is None else self.stop_reason.value,
            "lazy_requests": self.lazy_requests,
            "inputs": self.inputs.to_dict(),
        }


# ---------------------------------------------------------------------------------------------
# The model


def transfer_time(nbytes: int, link: LinkConditions, k: CostConstants, transfers: int = 1) -> float:
    """Seconds to ship ``nbytes`` in ``transfers`` separate transfers over ``link``."""
    if nbytes <= 0:
        return 0.0
    rate = link.throughput_bytes_per_s * k.throughput_efficiency
    return nbytes / rate + transfers * k.transfer_round_trips * link.rtt_s


def _growing_chunk_requests(nbytes: int, k: CostConstants) -> int:
    """Requests CRIU's background transfer needs for ``nbytes`` without an intervening fault:
    chunks of 1, 2, 3 ... times ``lazy_chunk_bytes``, capped at ``lazy_max_chunk_bytes``."""
    if nbytes <= 0:
        return 0
    step = max(k.lazy_chunk_bytes, PAGE_SIZE)
    cap_steps = max(1, k.lazy_max_chunk_bytes // step)
    units = nbytes / step
    ramp_units = cap_steps * (cap_steps + 1) / 2
    if units <= ramp_units:
        # smallest n with n(n+1)/2 >= units
        return math.ceil((math.sqrt(8 * units + 1) - 1) / 2 - 1e-9)
    return cap_steps + math.ceil((units - ramp_units) / cap_steps)


def lazy_requests(nbytes: int, k: CostConstants, demand_faults: int | None = None) -> int:
    """Round trips the lazy-pages daemon makes to move ``nbytes`` lazily.

    Each demand fault is one synchronous request and resets the background chunk to its
    smallest size, so while faults keep coming every fault is followed by one small chunk;
    what remains afterwards moves in growing chunks.
    """
    if nbytes <= 0:
        return 0
    faults = k.demand_faults if demand_faults is None else demand_faults
    faults = max(0, min(faults, math.ceil(nbytes / PAGE_SIZE)))
    after_faults = max(0, nbytes - faults * PAGE_SIZE)
    small_chunks = min(faults, math.ceil(after_faults / k.lazy_chunk_bytes))
    remaining = max(0, after_faults - small_chunks * k.lazy_chunk_bytes)
    return faults + small_chunks + _growing_chunk_requests(remaining, k)


def lazy_transfer_time(nbytes: int, link: LinkConditions, k: CostConstants) -> tuple[float, int]:
    """Seconds and requests to fault ``nbytes`` over ``link`` (one request at a time)."""
    if nbytes <= 0:
        return 0.0, 0
    requests = lazy_requests(nbytes, k)
    rate = link.throughput_bytes_per_s * k.throughput_efficiency
    return nbytes / rate + requests * link.rtt_s, requests


def gib(nbytes: float) -> float:
    """Bytes in GiB: the unit of the per-size constants."""
    return nbytes / GIB


def _checkpoint_time(written_bytes: int, compared_bytes: int, k: CostConstants) -> float:
    return (
        k.dump_fixed_s
        + k.freeze_s_per_gib * gib(written_bytes)
        + k.delta_s_per_gib * gib(compared_bytes)
    )


def _restore_time(eager_bytes: int, rebuilt_bytes: int, k: CostConstants) -> float:
    return (
        k.restore_fixed_s
        + k.restore_s_per_gib * gib(eager_bytes)
        + k.rebuild_s_per_gib * gib(rebuilt_bytes)
    )


@dataclass(frozen=True, slots=True)
class _PrecopyPhase:
    rounds: tuple[PrecopyRound, ...]
    stop_reason: StopReason
    last_dirty_bytes: int
    """Bytes dirtied during the last round: what the final dump (or the faults) must carry."""


def _precopy_phase(inputs: PredictionInputs) -> _PrecopyPhase:
    service, link, k, rules = inputs.service, inputs.link, inputs.constants, inputs.stop_rules
    s = service.state_bytes
    rounds: list[PrecopyRound] = []
    ship = s
    shipped = 0
    while True:
        index = len(rounds) + 1
        if inputs.native_predump:
            # soft-dirty: later rounds write only the dirty pages and need no comparison
            dump = _checkpoint_time(ship, 0, k)
        else:
            # a leave-running checkpoint writes every page; from round 2 on it is compared
            dump = _checkpoint_time(s, s if index > 1 else 0, k)
        xfer = transfer_time(ship, link, k)
        rounds.append(PrecopyRound(index=index, bytes=ship, dump_time=dump, transfer_time=xfer))
        shipped += ship
        dirtied = service.dirtied_bytes(dump + xfer)
        reason = rules.stop_reason(
            rounds_done=index,
            last_round_bytes=ship,
            next_round_bytes=dirtied,
            precopy_bytes_so_far=shipped,
            state_bytes=s,
        )
        if reason is not None:
            return _PrecopyPhase(tuple(rounds), reason, dirtied)
        ship = dirtied


def _predict_cold(inputs: PredictionInputs) -> Prediction:
    s, k, link = inputs.service.state_bytes, inputs.constants, inputs.link
    dump_bytes = s + k.image_overhead_bytes
    comps = MigrationComponents(
        dump_time=_checkpoint_time(s, 0, k),
        dump_transfer_time=transfer_time(dump_bytes, link, k),
        resume_time=_restore_time(s, 0, k),
        dump_bytes=dump_bytes,
    )
    return Prediction(technique=Technique.COLD, components=comps, inputs=inputs)


def _predict_precopy(inputs: PredictionInputs) -> Prediction:
    s, k, link = inputs.service.state_bytes, inputs.constants, inputs.link
    phase = _precopy_phase(inputs)
    dirty = phase.last_dirty_bytes
    dump_bytes = dirty + k.image_overhead_bytes
    if inputs.native_predump:
        dump_time = _checkpoint_time(dirty, 0, k)
        resume = _restore_time(s, 0, k)
    else:
        dump_time = _checkpoint_time(s, s, k)
        resume = _restore_time(s, s, k)
    comps = MigrationComponents(
        pre_dump_time=sum(r.dump_time for r in phase.rounds),
        pre_dump_transfer_time=sum(r.transfer_time for r in phase.rounds),
        dump_time=dump_time,
        dump_transfer_time=transfer_time(dump_bytes, link, k),
        resume_time=resume,
        pre_dump_bytes=sum(r.bytes for r in phase.rounds),
        dump_bytes=dump_bytes,
    )
    return Prediction(
        technique=Technique.PRECOPY,
        components=comps,
        inputs=inputs,
        rounds=phase.rounds,
        stop_reason=phase.stop_reason,
    )


def _predict_postcopy(inputs: PredictionInputs) -> Prediction:
    s, k, link = inputs.service.state_bytes, inputs.constants, inputs.link
    eager = min(k.lazy_dump_bytes, s)
    faulted = s - eager
    dump_bytes = eager + k.image_overhead_bytes
    fault_time, requests = lazy_transfer_time(faulted, link, k)
    warm = min(k.lazy_warm_bytes, s)
    comps = MigrationComponents(
        pre_dump_transfer_time=transfer_time(warm, link, k) if warm else 0.0,
        pre_dump_bytes=warm,
        dump_time=_checkpoint_time(eager, 0, k),
        dump_transfer_time=transfer_time(dump_bytes, link, k),
        resume_time=_restore_time(eager, 0, k) + k.lazy_resume_round_trips * link.rtt_s,
        faulted_pages_transfer_time=fault_time,
        dump_bytes=dump_bytes,
        faulted_pages_bytes=faulted,
    )
    return Prediction(
        technique=Technique.POSTCOPY, components=comps, inputs=inputs, lazy_requests=requests
    )


def _predict_hybrid(inputs: PredictionInputs) -> Prediction:
    s, k, link = inputs.service.state_bytes, inputs.constants, inputs.link
    phase = _precopy_phase(inputs)
    # Table 1: every page dirtied since the last round arrives as a faulted page; the final
    # dump is a lazy one, so like post-copy's it still ships the memory CRIU cannot serve lazily
    faulted = phase.last_dirty_bytes
    eager = min(k.lazy_dump_bytes, s)
    dump_bytes = eager + k.image_overhead_bytes
    if inputs.native_predump:
        dump_time = _checkpoint_time(eager, 0, k)
        rebuilt = 0
    else:
        # without soft-dirty the final dump still compares all memory to find what changed
        dump_time = _checkpoint_time(eager, s, k)
        rebuilt = s
    fault_time, requests = lazy_transfer_time(faulted, link, k)
    comps = MigrationComponents(
        pre_dump_time=sum(r.dump_time for r in phase.rounds),
        pre_dump_transfer_time=sum(r.transfer_time for r in phase.rounds),
        dump_time=dump_time,
        dump_transfer_time=transfer_time(dump_bytes, link, k),
        # everything but the faulted pages is restored from the pre-dump before resuming
        resume_time=_restore_time(s - faulted, rebuilt, k) + k.lazy_resume_round_trips * link.rtt_s,
        faulted_pages_transfer_time=fault_time,
        pre_dump_bytes=sum(r.bytes for r in phase.rounds),
        dump_bytes=dump_bytes,
        faulted_pages_bytes=faulted,
    )
    return Prediction(
        technique=Technique.HYBRID,
        components=comps,
        inputs=inputs,
        rounds=phase.rounds,
        stop_reason=phase.stop_reason,
        lazy_requests=requests,
    )


_PREDICTORS = {
    Technique.COLD: _predict_cold,
    Technique.PRECOPY: _predict_precopy,
    Technique.POSTCOPY: _predict_postcopy,
    Technique.HYBRID: _predict_hybrid,
}


def predict(
    technique: Technique,
    service: ServiceConditions,
    link: LinkConditions,
    *,
    source: NodeCapabilities | None = None,
    stop_rules: PrecopyStopRules | None = None,
    constants: CostConstants | None = None,
) -> Prediction:
    """Predict one technique. ``source`` decides whether pre-copy rounds use CRIU's native
    pre-dump (soft-dirty) or full leave-running checkpoints compared page by page."""
    inputs = PredictionInputs(
        service=service,
        link=link,
        native_predump=source.native_predump if source is not None else False,
        stop_rules=stop_rules if stop_rules is not None else PrecopyStopRules(),
        constants=constants if constants is not None else CostConstants(),
    )
    return _PREDICTORS[Technique(technique)](inputs)


def predict_all(
    service: ServiceConditions,
    link: LinkConditions,
    *,
    source: NodeCapabilities | None = None,
    stop_rules: PrecopyStopRules | None = None,
    constants: CostConstants | None = None,
    techniques: Iterable[Technique] = tuple(Technique),
) -> dict[Technique, Prediction]:
    return {
        t: predict(t, service, link, source=source, stop_rules=stop_rules, constants=constants)
        for t in techniques
    }
