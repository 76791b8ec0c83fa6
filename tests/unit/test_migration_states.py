"""The migration state machine: legal paths, the point of no return, failure semantics."""

from __future__ import annotations

import pytest

from fogmig.platform.base.vocabulary import Phase, Technique
from fogmig.platform.migration.states import IllegalTransition, MigrationStateMachine, forward_path


@pytest.mark.parametrize("technique", list(Technique))
def test_forward_path_reaches_done(technique: Technique) -> None:
    sm = MigrationStateMachine(technique)
    for phase in forward_path(technique)[1:]:
        sm.advance(phase)
    assert sm.phase is Phase.DONE
    assert sm.committed


def test_skipping_a_phase_is_refused() -> None:
    sm = MigrationStateMachine("cold")
    sm.advance(Phase.PREPARING)
    with pytest.raises(IllegalTransition):
        sm.advance(Phase.RESTORING)


def test_cold_has_no_precopy_or_lazy_phase() -> None:
    assert Phase.PRECOPY not in forward_path("cold")
    assert Phase.LAZY_PAGES not in forward_path("cold")
    assert Phase.LAZY_PAGES in forward_path("postcopy")
    assert Phase.PRECOPY in forward_path("hybrid")


@pytest.mark.parametrize("technique", list(Technique))
def test_every_failure_before_commit_rolls_back(technique: Technique) -> None:
    path = forward_path(technique)
    for stop in path[: path.index(Phase.COMMITTED)]:
        sm = MigrationStateMachine(technique)
        for phase in path[1 : path.index(stop) + 1]:
            sm.advance(phase)
        assert not sm.committed
        assert sm.fail() is Phase.ROLLING_BACK
        sm.rolled_back()
        assert sm.phase is Phase.ROLLED_BACK
        assert sm.done


@pytest.mark.parametrize("technique", list(Technique))
def test_failure_after_commit_leaves_destination_owner(technique: Technique) -> None:
    sm = MigrationStateMachine(technique)
    for phase in forward_path(technique)[1:]:
        sm.advance(phase)
        if phase is Phase.COMMITTED:
            break
    assert sm.fail() is Phase.FAILED
    with pytest.raises(IllegalTransition):
        sm.rolled_back()


def test_postcopy_lazy_window_is_before_the_point_of_no_return() -> None:
    sm = MigrationStateMachine("postcopy")
    for phase in forward_path("postcopy")[1:]:
        sm.advance(phase)
        if phase is Phase.LAZY_PAGES:
            break
    assert not sm.committed
    assert sm.fail() is Phase.ROLLING_BACK


def test_failed_rollback_ends_failed() -> None:
    sm = MigrationStateMachine("cold")
    sm.advance(Phase.PREPARING)
    sm.fail()
    assert sm.fail() is Phase.FAILED
    with pytest.raises(IllegalTransition):
        sm.fail()
