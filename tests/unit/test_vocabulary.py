"""The shared vocabulary and formatters, and how the bus validates the shared values."""

from __future__ import annotations

import json

import pytest

from fogmig.platform.base import fmt
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Phase, Technique
from fogmig.platform.bus.schemas import MigrateCommand, decode
from fogmig.platform.bus.topics import Rejection, SchemaError, topics
from fogmig.platform.migration.states import forward_path
from fogmig.policies.conditions import InvalidConditionsError, PrecopyStopRules


def test_technique_properties_shape_the_state_machine() -> None:
    assert [t for t in Technique if t.lazy] == [Technique.POSTCOPY, Technique.HYBRID]
    assert [t for t in Technique if t.precopy_rounds] == [Technique.PRECOPY, Technique.HYBRID]
    for t in Technique:
        path = forward_path(t)
        assert (Phase.PRECOPY in path) == t.precopy_rounds
        assert (Phase.LAZY_PAGES in path) == t.lazy


def test_outcomes_are_their_names_on_the_wire() -> None:
    assert json.dumps([Technique.HYBRID, Outcome.FAILED_AFTER_COMMIT]) == (
        '["hybrid", "failed_after_commit"]'
    )
    assert not Outcome.RUNNING.terminal
    assert Outcome.ROLLED_BACK.terminal


def _command(**precopy: object) -> bytes:
    cmd = {"version": 1, "kind": "migrate", "command_id": "c1", "service": "s1"}
    cmd |= {"destination": "gw2", "technique": "precopy", "precopy": precopy}
    return json.dumps(cmd).encode()


def test_the_bus_carries_the_policies_stop_rules_within_bounds() -> None:
    msg = decode(topics.cmd("gw1"), _command(max_rounds=3, max_precopy_bytes_factor=2))
    assert isinstance(msg, MigrateCommand)
    assert msg.technique is Technique.PRECOPY
    assert msg.precopy == PrecopyStopRules(max_rounds=3, max_precopy_bytes_factor=2.0)
    for bad in ({"max_rounds": 0}, {"max_rounds": 101}, {"max_precopy_bytes_factor": 0.5},
                {"min_changed_bytes": -1}, {"unknown": 1}, {"max_rounds": "3"}):  # fmt: skip
        with pytest.raises(SchemaError) as info:
            decode(topics.cmd("gw1"), _command(**bad))
        assert info.value.reason is Rejection.INVALID, bad


def test_stop_rules_built_in_code_raise_the_policies_error() -> None:
    with pytest.raises(InvalidConditionsError):
        PrecopyStopRules(max_rounds=101)
    with pytest.raises(InvalidConditionsError):
        PrecopyStopRules(max_precopy_bytes_factor=float("inf"))


def test_capabilities_keep_the_policies_form() -> None:
    caps = NodeCapabilities(postcopy=True, native_predump=False, criu_version="4.2")
    assert caps.to_dict() == {"postcopy": True, "native_predump": False}
    assert NodeCapabilities.from_dict(caps.to_dict()).postcopy


def test_formatters() -> None:
    assert fmt.duration(0.4204) == "420 ms"
    assert fmt.duration(1.254) == "1.25 s"
    assert fmt.duration(12.34, digits=1) == "12.3 s"
    assert fmt.duration(None) == "-"
    assert fmt.duration(None, missing="?") == "?"
    assert fmt.seconds(0.42) == "0.420 s"
    assert fmt.millis(4.25) == "4.2 ms"
    assert fmt.megabytes(8_800_000) == "8.8 MB"
    assert fmt.megabytes(1_234_567, digits=2) == "1.23 MB"
    assert fmt.byte_count(1_234_567) == "1,234,567 B"
