"""The controller's configuration: how it decides, with a working default for every field.

:func:`config_for_testbed` loads the one the embedded testbed needs (its link profile as the
assumed link between nodes that have not measured theirs); :func:`load_cost_constants` reads the
cost model's constants that ``fogmig calibrate`` fitted to measured migrations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from fogmig.platform.base.errors import ConfigError
from fogmig.policies.calibration import constants_document, parse_constants_document
from fogmig.policies.conditions import LinkConditions, Objective, PrecopyStopRules
from fogmig.policies.costmodel import CostConstants

Trigger = Literal["mobility", "load", "drain"]
ObjectiveName = Literal["downtime", "total", "bytes"]

OBJECTIVES: Final[dict[str, Callable[[], Objective]]] = {
    "downtime": Objective.least_downtime,
    "total": Objective.least_total_time,
    "bytes": Objective.least_bytes,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ControllerConfig:
    """How the controller decides; every field has a working default."""

    debounce_s: float = 1.5
    """An attachment must stay on one gateway this long before its service follows it."""
    load_threshold: float = 0.8
    """A node above this load (fraction of capacity) for ``load_reports`` reports in a row is
    overloaded."""
    load_target: float = 0.6
    """A node taking a service for load reasons must stay at or below this load afterwards."""
    load_reports: int = 3
    objective: ObjectiveName = "downtime"
    default_link: LinkConditions = field(
        default_factory=lambda: LinkConditions.from_mbit(11.34, 122.95)
    )
    """The data link assumed between two nodes that have not measured it (the profile's)."""
    default_state_bytes: int = 4 << 20
    """State size assumed for a service its node does not (yet) report."""
    stop_rules: PrecopyStopRules = field(default_factory=PrecopyStopRules)
    cost_constants: CostConstants | None = None
    """The cost model's constants (``None``: the model's defaults); see ``load_cost_constants``."""
    compression: bool = True
    """Adaptive zstd on the state transfer (off where the data does not compress)."""
    mem_reserve_bytes: int = 64 << 20
    max_migrations_per_node: int = 1
    """Migrations one node takes part in at once (as source or destination): the cost model
    assumes a migration has the data link to itself."""
    ack_timeout_s: float = 10.0
    done_timeout_s: float = 900.0
    """An accepted migration with no MigrationDone after this long is given up as lost."""
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    max_attempts: int = 8
    decision_log: Path | None = None
    state_file: Path | None = None
    """Where the controller keeps what must outlive a restart (``None``: nothing is kept)."""
    site: str | None = None
    """The site the state belongs to: a state file saved for another is not taken."""
    save_debounce_s: float = 1.0
    """Changes of attachments alone are saved at most this often; moves and drains at once."""

    def __post_init__(self) -> None:
        if self.debounce_s < 0:
            raise ConfigError(f"debounce must be >= 0 s, got {self.debounce_s}")
        if not 0 <= self.load_target < self.load_threshold:
            raise ConfigError(
                f"need 0 <= load target ({self.load_target}) < load threshold "
                f"({self.load_threshold})"
            )
        if self.load_reports < 1 or self.max_attempts < 1 or self.max_migrations_per_node < 1:
            raise ConfigError("load_reports, max_attempts and max_migrations_per_node must be >= 1")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}"
            )
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ConfigError("need 0 < retry_initial_s <= retry_max_s")
        if self.save_debounce_s < 0:
            raise ConfigError(f"save debounce must be >= 0 s, got {self.save_debounce_s}")
        if self.ack_timeout_s <= 0 or self.done_timeout_s <= 0:
            raise ConfigError("timeouts must be > 0")

    def retry_delay(self, attempts: int) -> float:
        """The pause before attempt ``attempts + 1`` (exponential, capped)."""
        return float(min(self.retry_max_s, self.retry_initial_s * 2.0 ** max(attempts - 1, 0)))


def config_for_testbed(**overrides: Any) -> ControllerConfig:
    """The controller's configuration on the testbed: links default to the testbed's profile,
    and the site a state file must belong to is this testbed (``state_file`` is not set: the
    daemon sets it, an in-process controller keeps nothing unless asked)."""
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    profile = state.profile
    link = LinkConditions.from_mbit(profile.rate_mbit, profile.rtt_ms)
    overrides.setdefault("site", f"testbed@{state.created_at:.6f}")
    return ControllerConfig(default_link=link, **overrides)


def load_cost_constants(path: Path) -> CostConstants:
    """The cost model's constants from a file ``fogmig calibrate`` wrote.

    A missing, unreadable or malformed file, an unknown constant or one out of range is a
    ``ConfigError`` naming the file and what is wrong with it.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the cost constants file {path}: {exc.strerror or exc}",
            hint="write one with `fogmig calibrate RECORDS_DIR --out FILE`",
        ) from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON: {exc}",
            hint="write it with `fogmig calibrate RECORDS_DIR --out FILE`",
        ) from exc
    return parse_constants_document(doc, str(path))


def save_cost_constants(
    path: Path, constants: CostConstants, *, about: dict[str, Any] | None = None
) -> Path:
    """Write ``constants`` where :func:`load_cost_constants` reads them back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(constants_document(constants, about=about), indent=2) + "\n")
    tmp.replace(path)
    return path
