"""The evaluation grid: its cells, the control configurations, the quick grid, the ETA."""

from __future__ import annotations

import pytest

from fogmig.experiments.eta import FIXED_S, Eta, model_s
from fogmig.experiments.grid import (
    QUICK_RUNS,
    QUICK_STATE_MB,
    Cell,
    GridSpec,
    base_configuration,
    control_name,
    remaining,
)
from fogmig.platform.base.errors import ConfigError


def test_the_full_grid_is_four_configurations_four_techniques_five_runs_and_a_control() -> None:
    spec = GridSpec()
    assert spec.configuration_names() == ["A", "B", "C", "D", "C-mtu1500"]
    cells = spec.cells()
    assert len(cells) == 5 * 4 * 5
    assert len(set(cells)) == len(cells)
    # Every technique's first run comes before any second run of a configuration.
    assert [c.technique for c in cells[:4]] == ["cold", "precopy", "postcopy", "hybrid"]
    assert cells[4] == Cell("A", "cold", 2)
    assert spec.mtu_of("C-mtu1500") == 1500
    assert spec.mtu_of("C") is None


def test_one_testbed_per_link_and_mtu() -> None:
    groups = GridSpec().by_link()
    assert groups == [
        ("mobility", None, ["A", "B"]),
        ("orchestration", None, ["C", "D"]),
        ("orchestration", 1500, ["C-mtu1500"]),
    ]


def test_the_quick_grid_shrinks_the_state_and_the_runs_and_adds_the_baseline() -> None:
    quick, full = GridSpec.quick_grid(), GridSpec()
    assert (quick.runs, quick.state_mb, quick.quick) == (QUICK_RUNS, QUICK_STATE_MB, True)
    assert quick.baseline
    assert not full.baseline
    assert quick.configuration_names() == full.configuration_names()
    assert GridSpec.quick_grid(runs=1).runs == 1


def test_a_grid_survives_its_json_form() -> None:
    spec = GridSpec(configurations=("C",), techniques=("cold",), runs=2, control=())
    assert GridSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"configurations": ("E",)}, "unknown configuration"),
        ({"control": ("Z",)}, "unknown configuration"),
        ({"techniques": ("teleport",)}, "unknown technique"),
        ({"runs": 0}, "at least one run"),
        ({"control_mtu": 100}, "MTU"),
    ],
)
def test_a_bad_grid_is_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GridSpec(**fields)  # type: ignore[arg-type]


def test_a_grid_json_that_is_not_a_grid_is_refused() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        GridSpec.from_json("{")
    with pytest.raises(ConfigError, match="does not describe a grid"):
        GridSpec.from_json('{"planets": 3}')


def test_control_names_map_back_to_their_configuration() -> None:
    assert control_name("C") == "C-mtu1500"
    assert base_configuration("C-mtu1500") == "C"
    assert base_configuration("B") == "B"


def test_remaining_keeps_the_grid_order() -> None:
    spec = GridSpec(configurations=("C",), techniques=("cold", "hybrid"), runs=2, control=())
    done = {Cell("C", "cold", 1), Cell("C", "hybrid", 2)}
    assert remaining(spec, done) == [Cell("C", "hybrid", 1), Cell("C", "cold", 2)]


def test_the_eta_uses_the_model_until_runs_are_measured() -> None:
    spec = GridSpec(configurations=("A", "C"), techniques=("cold", "postcopy"), runs=2, control=())
    eta = Eta(spec)
    cold_c, cold_a = Cell("C", "cold", 1), Cell("A", "cold", 1)
    assert model_s(spec, cold_a) > model_s(spec, cold_c) > FIXED_S  # slower link
    # Post-copy on the long-RTT link is expected to take longer than cold on it.
    assert model_s(spec, Cell("A", "postcopy", 1)) > model_s(spec, cold_a)
    before = eta.remaining_s()
    eta.finished(cold_c, 5.0)
    assert eta.expected_s(Cell("C", "cold", 2)) == 5.0
    assert eta.remaining_s() == pytest.approx(before - model_s(spec, cold_c) * 2 + 5.0)
    eta.skip([Cell("A", "cold", 1)])
    assert "2/8 done" in eta.text()
