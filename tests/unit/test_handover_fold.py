"""The frozen service's last data rides with the restore only while the lease is young."""

from __future__ import annotations

from fogmig.platform.migration.handover.events import (
    Action,
    Ids,
    ReplyIn,
    RunStep,
    SendCall,
    StepDone,
)
from fogmig.platform.migration.handover.messages import (
    PrepareOk,
    Restore,
    SendFiles,
    Ticket,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.source_core import Plan, SourceCore

MID = "m-1"
TIMING = Timing()


def _core() -> SourceCore:
    plan = Plan(
        migration_id=MID,
        service="svc",
        source="src",
        destination="dst",
        technique="cold",  # type: ignore[arg-type]
        epoch=1,
        live_moves=False,
        restore=Restore(migration_id=MID, epoch=0, mode="full", images="final"),
    )
    return SourceCore(plan=plan, timing=TIMING, ids=Ids())


def _one(actions: list[Action], kind: type) -> object:
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def _call_after_final_move(seconds_after_ticket: float) -> SendCall:
    core = _core()
    prepare = _one(core.start(0.0), SendCall)
    assert isinstance(prepare, SendCall)
    ticket = Ticket(incarnation=1, seq=1)
    freeze = _one(
        core.handle(
            ReplyIn(prepare.call_id, PrepareOk(migration_id=MID, ticket=ticket, node="dst")), 0.0
        ),
        RunStep,
    )
    assert isinstance(freeze, RunStep)
    move = _one(core.handle(StepDone(freeze.step_id, True), 0.1), RunStep)
    assert isinstance(move, RunStep)
    files = SendFiles(migration_id=MID, name="final", files=3, bytes=1000)
    now = 0.1 + seconds_after_ticket
    call = _one(core.handle(StepDone(move.step_id, True, call=files), now), SendCall)
    assert isinstance(call, SendCall)
    return call


def test_a_quick_final_transfer_goes_with_the_restore() -> None:
    call = _call_after_final_move(0.5)
    assert isinstance(call.request, Restore)
    assert isinstance(call.request.prelude, SendFiles)


def test_a_final_transfer_that_outlasts_a_quarter_of_the_lease_confirms_first() -> None:
    # Cold on the mobility link: 65 s of image after the prepare's ticket.
    call = _call_after_final_move(65.0)
    assert isinstance(call.request, SendFiles)
