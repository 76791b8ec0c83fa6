"""The evaluation grid: configurations A-D, techniques, runs, and the control on a 1500-byte MTU.

A configuration pairs a link profile with a page dirtying rate (docs/evaluation.md has the
table). The grid is every (configuration, technique, run) cell, plus the same cells of the
control configurations at MTU 1500. Pure: no I/O beyond its JSON form, which a resumed grid
reads back so that it continues exactly the grid it started.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.vocabulary import Technique

FULL_STATE_MB: Final = 75
"""The service's state in the paper's evaluation (memory it allocates and fills at random)."""
QUICK_STATE_MB: Final = 8
"""The scaled-down state of ``--quick``: transfer times shrink about tenfold, while every
configuration keeps its dirty rate and link, hence the ratio of dirty rate to throughput that
sets it apart from the others (see docs/evaluation.md for what else a smaller state changes)."""
DEFAULT_RUNS: Final = 5
QUICK_RUNS: Final = 2
CONTROL_MTU: Final = 1500
"""An Ethernet-sized MTU; the testbed's data links otherwise use a much larger one."""
ENGINE: Final = "fogmig"
"""The engine name of this platform's records; a baseline writes its own beside them."""


@dataclass(frozen=True, slots=True)
class Configuration:
    """One configuration of the evaluation: a link profile and a page dirtying rate."""

    name: str
    """A, B, C or D."""
    profile: str
    """The testbed's link profile: ``mobility`` or ``orchestration``."""
    dirty_kbps: float
    """Page dirtying rate of the service, KB/s."""
    summary: str
    """What the configuration examines, in a sentence."""


CONFIGURATIONS: Final = {
    "A": Configuration(
        name="A",
        profile="mobility",
        dirty_kbps=10.0,
        summary="slow link, low dirty rate: a long pre-copy phase",
    ),
    "B": Configuration(
        name="B",
        profile="mobility",
        dirty_kbps=500.0,
        summary="slow link, dirty rate of the link's order of magnitude",
    ),
    "C": Configuration(
        name="C",
        profile="orchestration",
        dirty_kbps=10.0,
        summary="fast link, low dirty rate: a short pre-copy phase",
    ),
    "D": Configuration(
        name="D",
        profile="orchestration",
        dirty_kbps=500.0,
        summary="fast link, dirty rate an order of magnitude below the link",
    ),
}


def control_name(config: str, mtu: int = CONTROL_MTU) -> str:
    """The name of a configuration's control run at ``mtu`` (e.g. ``C-mtu1500``)."""
    return f"{config}-mtu{mtu}"


def base_configuration(name: str) -> str:
    """``C`` for ``C`` and for its control ``C-mtu1500``."""
    return name.split("-", 1)[0]


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    """One run of the grid: which configuration, technique and run number."""

    configuration: str
    """A configuration's name, or its control's (``C-mtu1500``)."""
    technique: str
    run: int
    """1-based."""

    @property
    def key(self) -> str:
        return f"{self.configuration}/{self.technique}/{self.run}"


@dataclass(frozen=True, slots=True)
class GridSpec:
    """What a grid runs; written to ``grid.json`` so that ``--resume`` runs the same grid."""

    configurations: tuple[str, ...] = ("A", "B", "C", "D")
    techniques: tuple[str, ...] = tuple(Technique)
    runs: int = DEFAULT_RUNS
    state_mb: int = FULL_STATE_MB
    control: tuple[str, ...] = ("C",)
    """Configurations also run on links with MTU ``control_mtu`` (none: no control)."""
    control_mtu: int = CONTROL_MTU
    probe_hz: float = 20.0
    baseline: bool = False
    """Also run every cell with the paper's own toolchain (engine ``runc-rsync``)."""
    quick: bool = False
    service: str = "bench"
    port: int = 5690
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept with the grid (e.g. the command line)."""

    def __post_init__(self) -> None:
        unknown = [c for c in (*self.configurations, *self.control) if c not in CONFIGURATIONS]
        if unknown:
            raise ConfigError(
                f"unknown configuration(s) {', '.join(unknown)}", hint="use A, B, C and D"
            )
        bad = [t for t in self.techniques if t not in set(Technique)]
        if bad:
            raise ConfigError(f"unknown technique(s) {', '.join(bad)}")
        if self.runs < 1:
            raise ConfigError("a grid needs at least one run per cell")
        if self.state_mb < 1:
            raise ConfigError("the service's state must be at least 1 MB")
        if not 576 <= self.control_mtu <= 65535:
            raise ConfigError(f"the control MTU {self.control_mtu} is not a usable IPv4 MTU")

    @classmethod
    def quick_grid(cls, **overrides: Any) -> GridSpec:
        """The scaled-down grid of ``--quick``: small state, two runs, and the paper's toolchain
        beside fogmig (it doubles a grid's time: minutes here, hours on the full grid)."""
        base: dict[str, Any] = {
            "runs": QUICK_RUNS,
            "state_mb": QUICK_STATE_MB,
            "quick": True,
            "baseline": True,
        }
        return cls(**{**base, **overrides})

    def configuration_names(self) -> list[str]:
        """Every configuration of the grid, the controls last."""
        return [*self.configurations, *(control_name(c, self.control_mtu) for c in self.control)]

    def mtu_of(self, configuration: str) -> int | None:
        """The MTU a configuration runs at; None: the testbed's own."""
        return self.control_mtu if "-mtu" in configuration else None

    def cells(self) -> list[Cell]:
        """Every cell, in the order they run: by configuration, then run, then technique
        (so that an interrupted grid has every technique's first runs)."""
        return [
            Cell(configuration=c, technique=t, run=r)
            for c, r, t in itertools.product(
                self.configuration_names(), range(1, self.runs + 1), self.techniques
            )
        ]

    def by_link(self) -> list[tuple[str, int | None, list[str]]]:
        """The configurations grouped by (link profile, MTU), in grid order: one testbed
        bring-up per group."""
        groups: dict[tuple[str, int | None], list[str]] = {}
        for name in self.configuration_names():
            conf = CONFIGURATIONS[base_configuration(name)]
            groups.setdefault((conf.profile, self.mtu_of(name)), []).append(name)
        return [(profile, mtu, names) for (profile, mtu), names in groups.items()]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> GridSpec:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"grid.json is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError("grid.json must hold an object")
        for key in ("configurations", "techniques", "control"):
            if key in raw:
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"grid.json does not describe a grid: {exc}") from exc


def remaining(spec: GridSpec, done: Sequence[Cell] | set[Cell]) -> list[Cell]:
    """The cells still to run, in order."""
    finished = set(done)
    return [c for c in spec.cells() if c not in finished]


def iter_techniques(spec: GridSpec) -> Iterator[Technique]:
    return (Technique(t) for t in spec.techniques)
