"""Typed inputs of the technique and placement policies: service, link and node conditions.

Everything here is a frozen, validated value with a JSON form, so that a decision can carry the
exact inputs it was made from and be replayed or held against a measurement later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import ConfigDict, Field

from fogmig.platform.base.errors import ConfigError

MB = 1_000_000
"""The paper's megabyte (decimal, as rsync and iperf3 report it)."""

MIB = 1 << 20


class InvalidConditionsError(ConfigError):
    """A condition handed to the policies is out of range (negative size, zero throughput ...)."""


def _finite(name: str, value: float, *, minimum: float = 0.0, strict: bool = False) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidConditionsError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise InvalidConditionsError(f"{name} must be {relation} {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class ServiceConditions:
    """What the migration has to move and how fast the service changes it.

    ``state_bytes`` is the memory a full checkpoint holds (CRIU's pages images), which the paper
    calls the runtime state size; ``dirty_rate_bytes_per_s`` is the page dirtying rate D.
    ``writable_bytes`` bounds how much distinct memory the service can dirty at all (its hot
    set); ``None`` means the whole state.
    """

    state_bytes: int
    dirty_rate_bytes_per_s: float
    writable_bytes: int | None = None

    def __post_init__(self) -> None:
        _finite("state_bytes", self.state_bytes)
        _finite("dirty_rate_bytes_per_s", self.dirty_rate_bytes_per_s)
        if self.writable_bytes is not None:
            _finite("writable_bytes", self.writable_bytes)

    @property
    def dirtiable_bytes(self) -> int:
        """The most distinct bytes the service can have dirtied after any time."""
        if self.writable_bytes is None:
            return self.state_bytes
        return min(self.writable_bytes, self.state_bytes)

    def dirtied_bytes(self, seconds: float) -> int:
        """Distinct bytes dirtied in ``seconds``: D times t, bounded by what can be dirtied."""
        dirtied = self.dirty_rate_bytes_per_s * max(seconds, 0.0)
        if not math.isfinite(dirtied):  # an endless time dirties everything there is
            return self.dirtiable_bytes
        return min(self.dirtiable_bytes, round(dirtied))

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_bytes": self.state_bytes,
            "dirty_rate_bytes_per_s": self.dirty_rate_bytes_per_s,
            "writable_bytes": self.writable_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceConditions:
        return cls(
            state_bytes=int(data["state_bytes"]),
            dirty_rate_bytes_per_s=float(data["dirty_rate_bytes_per_s"]),
            writable_bytes=None
            if data.get("writable_bytes") is None
            else int(data["writable_bytes"]),
        )


@dataclass(frozen=True, slots=True)
class LinkConditions:
    """The data link between source and destination as measured: throughput B and RTT."""

    throughput_bytes_per_s: float
    rtt_s: float

    def __post_init__(self) -> None:
        _finite("throughput_bytes_per_s", self.throughput_bytes_per_s, strict=True)
        _finite("rtt_s", self.rtt_s)

    @classmethod
    def from_mbit(cls, mbit_per_s: float, rtt_ms: float) -> LinkConditions:
        """From the units of the paper's Table 2 (Mbit/s and milliseconds)."""
        return cls(throughput_bytes_per_s=mbit_per_s * 1e6 / 8, rtt_s=rtt_ms / 1000)

    @property
    def throughput_mbit_per_s(self) -> float:
        return self.throughput_bytes_per_s * 8 / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {"throughput_bytes_per_s": self.throughput_bytes_per_s, "rtt_s": self.rtt_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkConditions:
        return cls(
            throughput_bytes_per_s=float(data["throughput_bytes_per_s"]),
            rtt_s=float(data["rtt_s"]),
        )


class StopReason(StrEnum):
    """Why the pre-copy phase ended and the final dump was taken."""

    CONVERGED = "converged"
    """The next round would ship no more than ``min_changed_bytes``."""
    MAX_ROUNDS = "max_rounds"
    NOT_SHRINKING = "not_shrinking"
    """The next round would ship at least as much as the last one: dirtying outruns the link."""
    BYTE_BUDGET = "byte_budget"
    """Another round would push the pre-copy traffic past ``max_precopy_bytes_factor`` x S."""
    NO_GAIN = "no_gain"
    """Another round would not shorten the part after the freeze by more than it lengthens
    the total time (``policies.stoprule``)."""


MAX_ROUNDS = 100
MAX_PRECOPY_BYTES_FACTOR = 1000.0


@dataclass(frozen=True, slots=True)
class PrecopyStopRules:
    """When iterative pre-copy stops and takes the final dump.

    Round 1 always ships the whole state. After round i the rules look at what round i+1 would
    ship (the bytes dirtied during round i) and stop when any of them fires. The migration
    engine evaluates the same rules on measured bytes through ``stop_reason``; a migrate
    command carries them on the bus, whose schemas validate them within the bounds below.
    """

    # A typo on the wire is an error, not a silent default (the bus schemas validate it).
    __pydantic_config__ = ConfigDict(extra="forbid")

    max_rounds: Annotated[int, Field(ge=1, le=MAX_ROUNDS)] = 4
    min_changed_bytes: Annotated[int, Field(ge=0)] = 512 * 1024
    stop_when_not_shrinking: bool = True
    max_precopy_bytes_factor: Annotated[float, Field(ge=1.0, le=MAX_PRECOPY_BYTES_FACTOR)] = 3.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_rounds, int) or not 1 <= self.max_rounds <= MAX_ROUNDS:
            raise InvalidConditionsError(
                f"max_rounds must be an int in 1..{MAX_ROUNDS}, got {self.max_rounds!r}"
            )
        _finite("min_changed_bytes", self.min_changed_bytes)
        _finite("max_precopy_bytes_factor", self.max_precopy_bytes_factor, minimum=1.0)
        if self.max_precopy_bytes_factor > MAX_PRECOPY_BYTES_FACTOR:
            raise InvalidConditionsError(
                f"max_precopy_bytes_factor must be <= {MAX_PRECOPY_BYTES_FACTOR}, "
                f"got {self.max_precopy_bytes_factor!r}"
            )

    @classmethod
    def single_round(cls) -> PrecopyStopRules:
        """The paper's implementation: one pre-dump, then the final dump (section 4.2.1)."""
        return cls(max_rounds=1)

    def stop_reason(
        self,
        *,
        rounds_done: int,
        last_round_bytes: int,
        next_round_bytes: int,
        precopy_bytes_so_far: int,
        state_bytes: int,
    ) -> StopReason | None:
        """Whether to stop after ``rounds_done`` rounds; ``None`` means run another round."""
        if next_round_bytes <= self.min_changed_bytes:
            return StopReason.CONVERGED
        if rounds_done >= self.max_rounds:
            return StopReason.MAX_ROUNDS
        if self.stop_when_not_shrinking and next_round_bytes >= last_round_bytes:
            return StopReason.NOT_SHRINKING
        budget = self.max_precopy_bytes_factor * max(state_bytes, 1)
        if precopy_bytes_so_far + next_round_bytes > budget:
            return StopReason.BYTE_BUDGET
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_rounds": self.max_rounds,
            "min_changed_bytes": self.min_changed_bytes,
            "stop_when_not_shrinking": self.stop_when_not_shrinking,
            "max_precopy_bytes_factor": self.max_precopy_bytes_factor,
        }


class Metric(StrEnum):
    """What an objective minimises; the paper's three headline metrics (section 5.2)."""

    DOWNTIME = "downtime"
    TOTAL_TIME = "total_time"
    TRANSFERRED_BYTES = "transferred_bytes"


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Two values of a metric tie when they differ by at most ``max(absolute, relative*best)``."""

    absolute: float
    relative: float

    def __post_init__(self) -> None:
        _finite("tolerance.absolute", self.absolute)
        _finite("tolerance.relative", self.relative)

    def ties(self, value: float, best: float) -> bool:
        return value - best <= max(self.absolute, self.relative * abs(best))


# A device of the paper sends one request per second, so downtimes less than a second apart are
# indistinguishable to it; total times and bytes within 10% / 5% are within run-to-run noise.
_DEFAULT_TOLERANCES: dict[Metric, Tolerance] = {
    Metric.DOWNTIME: Tolerance(absolute=1.0, relative=0.10),
    Metric.TOTAL_TIME: Tolerance(absolute=1.0, relative=0.10),
    Metric.TRANSFERRED_BYTES: Tolerance(absolute=256 * 1024, relative=0.05),
}


@dataclass(frozen=True, slots=True)
class Objective:
    """A lexicographic objective: minimise ``order[0]``, among near-ties ``order[1]``, ...

    Whatever still ties at the end is settled toward the paper's rule (``rules.recommend``).
    """

    order: tuple[Metric, ...] = (Metric.DOWNTIME, Metric.TOTAL_TIME)
    tolerances: tuple[tuple[Metric, Tolerance], ...] = field(
        default_factory=lambda: tuple(_DEFAULT_TOLERANCES.items())
    )

    def __post_init__(self) -> None:
        if not self.order:
            raise InvalidConditionsError("an objective needs at least one metric")
        if len(set(self.order)) != len(self.order):
            raise InvalidConditionsError(f"objective repeats a metric: {self.order}")

    @classmethod
    def least_downtime(cls) -> Objective:
        """The default: least downtime, then least total migration time."""
        return cls(order=(Metric.DOWNTIME, Metric.TOTAL_TIME))

    @classmethod
    def least_total_time(cls) -> Objective:
        return cls(order=(Metric.TOTAL_TIME, Metric.DOWNTIME))

    @classmethod
    def least_bytes(cls) -> Objective:
        return cls(order=(Metric.TRANSFERRED_BYTES, Metric.DOWNTIME))

    @property
    def primary(self) -> Metric:
        return self.order[0]

    @property
    def name(self) -> str:
        return "least " + ", then least ".join(m.value.replace("_", " ") for m in self.order)

    def tolerance(self, metric: Metric) -> Tolerance:
        return dict(self.tolerances).get(metric, _DEFAULT_TOLERANCES[metric])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "order": [m.value for m in self.order],
            "tolerances": {
                m.value: {
                    "absolute": self.tolerance(m).absolute,
                    "relative": self.tolerance(m).relative,
                }
                for m in self.order
            },
        }


@dataclass(frozen=True, slots=True)
class PaperConfiguration:
    """One of the paper's configurations A-D (section 5.1, Tables 2 and 3)."""

    name: str
    use_case: str
    dirty_rate_label: str
    service: ServiceConditions
    link: LinkConditions
    description: str


PAPER_APP_STATE_BYTES = 75 * MB
"""What the paper's server allocates (section 5.1)."""

PAPER_CHECKPOINT_BYTES = 110 * MB
"""What a checkpoint of that container actually held: "more than 110 MB are transferred on
average" (section 5.2.3); this is the runtime state S the techniques move."""

PAPER_MOBILITY = LinkConditions.from_mbit(11.34, 122.95)
PAPER_MANAGEMENT = LinkConditions.from_mbit(72.41, 6.94)
PAPER_LOW_DIRTY_RATE = 10_000.0
PAPER_HIGH_DIRTY_RATE = 500_000.0


_USE_CASES = {
    # Table 2 (use case -> link) and Table 3 (link x dirtying rate -> configuration)
    "mobility": PAPER_MOBILITY,
    "management/orchestration": PAPER_MANAGEMENT,
}
_RATES = {"low": PAPER_LOW_DIRTY_RATE, "high": PAPER_HIGH_DIRTY_RATE}
_TABLE3 = (
    ("A", "mobility", "low", "large state for the throughput: prolonged pre-copy phase"),
    ("B", "mobility", "high", "as A, with a dirtying rate of the throughput's order of magnitude"),
    ("C", "management/orchestration", "low", "short pre-copy phase, rate 3 orders below B"),
    ("D", "management/orchestration", "high", "as C, with a rate still an order below B"),
)

PAPER_CONFIGURATIONS: dict[str, PaperConfiguration] = {
    name: PaperConfiguration(
        name=name,
        use_case=use_case,
        dirty_rate_label=rate,
        service=ServiceConditions(
            state_bytes=PAPER_CHECKPOINT_BYTES, dirty_rate_bytes_per_s=_RATES[rate]
        ),
        link=_USE_CASES[use_case],
        description=text,
    )
    for name, use_case, rate, text in _TABLE3
}
