"""What the controller's core keeps across a restart, and how it is taken and given back.

:class:`SavedController` is the file's pydantic model: attachments, drain flags, queued and
running migrations (their command and decision), where completed ones took their services
and the ids of ended migrations. Times on the controller's monotonic clock are saved as ages
and waits, and rebased on load by the wall time that passed. No I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from fogmig.platform.bus.schemas import (
    Decision,
    DeviceName,
    Id,
    MigrateCommand,
    NodeName,
    ServiceName,
)
from fogmig.platform.controller.actions import Action, InFlight, Launch, PendingMove
from fogmig.platform.controller.config import Trigger
from fogmig.platform.controller.registry import Attachment

if TYPE_CHECKING:
    from fogmig.platform.controller.core import ControllerCore

FORMAT: Literal["fogmig-controller-state"] = "fogmig-controller-state"
ENDED_SAVED = 512
"""Ids of ended migrations saved (the newest): enough to recognise a MigrationDone repeated
by an agent that restarted together with the controller."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SavedAttachment(_Model):
    device: DeviceName
    gateway: NodeName
    service: ServiceName
    at: float
    age_s: float = Field(ge=0)
    """How long the device had been on its gateway when the state was saved."""
    settled: bool


class SavedPending(_Model):
    service: ServiceName
    target: NodeName
    trigger: Trigger
    detail: str
    wait_s: float = Field(ge=0)
    """Backoff left when the state was saved."""
    attempts: int = Field(ge=0)


class SavedInFlight(_Model):
    source: NodeName
    command: MigrateCommand
    decision: Decision
    trigger: Trigger
    detail: str
    attempts: int = Field(ge=0)
    age_s: float = Field(ge=0)
    """Time since the command was sent, when the state was saved."""
    acked: bool
    acked_at: float | None = None
    """Wall clock when the source took it: a status stamped later shows whether it ended."""


class SavedMove(_Model):
    node: NodeName
    at: float


class SavedController(_Model):
    """The controller's state file (``<state dir>/controller/state.json`` by default)."""

    format: Literal["fogmig-controller-state"] = FORMAT
    version: Literal[1] = 1
    site: str | None
    """The site the state belongs to (on the testbed: the testbed it was brought up as)."""
    saved_at: float
    """Wall clock when it was written."""
    attachments: list[SavedAttachment] = Field(default_factory=list)
    draining: dict[NodeName, bool] = Field(default_factory=dict)
    pending: list[SavedPending] = Field(default_factory=list)
    inflight: list[SavedInFlight] = Field(default_factory=list)
    moved: dict[ServiceName, SavedMove] = Field(default_factory=dict)
    ended: list[Id] = Field(default_factory=list)


def take(core: ControllerCore, now: float, *, site: str | None) -> SavedController:
    """What ``core`` holds at monotonic time ``now`` that must outlive the process."""
    reg = core.registry
    return SavedController(
        site=site,
        saved_at=core.wall(),
        attachments=[
            SavedAttachment(
                device=a.device,
                gateway=a.gateway,
                service=a.service,
                at=a.at,
                age_s=max(0.0, now - a.since),
                settled=a.settled,
            )
            for a in reg.attachments.values()
        ],
        draining=dict(core.draining),
        pending=[
            SavedPending(
                service=m.service,
                target=m.target,
                trigger=m.trigger,
                detail=m.detail,
                wait_s=max(0.0, m.not_before - now),
                attempts=m.attempts,
            )
            for m in core.pending.values()
        ],
        inflight=[
            SavedInFlight(
                source=f.source,
                command=f.command,
                decision=f.decision,
                trigger=f.trigger,
                detail=f.detail,
                attempts=f.attempts,
                age_s=max(0.0, now - f.sent_at),
                acked=f.acked,
                acked_at=f.acked_wall if f.acked else None,
            )
            for f in core.inflight.values()
        ],
        moved={s: SavedMove(node=n, at=at) for s, (n, at) in reg.moved_hints().items()},
        ended=core.ended_ids()[-ENDED_SAVED:],
    )


def give_back(core: ControllerCore, saved: SavedController, now: float) -> list[Action]:
    """Load ``saved`` into a fresh ``core`` at monotonic time ``now``.

    Returns what to do at once: the commands the controller sent without hearing an answer go
    again under their own id (an agent that took one refuses it as a replay, which the core
    takes as its acknowledgement; one that never got it runs it once). Commands an agent took
    wait for their MigrationDone or for the source's status to show the migration over.
    """
    gone = max(0.0, core.wall() - saved.saved_at)
    reg = core.registry
    for a in saved.attachments:
        att = Attachment(
            a.device, a.gateway, a.service, a.at, since=now - a.age_s - gone, settled=a.settled
        )
        reg.restore_attachment(att)
        if not att.settled:
            core.arm_settle(att, now)
    for service, move in saved.moved.items():
        reg.note_moved(service, move.node, move.at)
    core.draining.update(saved.draining)
    core.remember_ended(saved.ended)
    for p in saved.pending:
        core.pending[p.service] = PendingMove(
            p.service,
            p.target,
            p.trigger,
            p.detail,
            not_before=now + max(0.0, p.wait_s - gone),
            attempts=p.attempts,
        )
    actions: list[Action] = []
    for f in saved.inflight:
        flight = InFlight(
            serial=core.next_serial(),
            source=f.source,
            command=f.command,
            decision=f.decision,
            trigger=f.trigger,
            detail=f.detail,
            attempts=f.attempts,
            sent_at=now - f.age_s - gone,
            acked=f.acked,
            resumed=True,
            acked_wall=f.acked_at if f.acked and f.acked_at is not None else core.wall(),
        )
        core.inflight[f.command.service] = flight
        core.pending.pop(f.command.service, None)
        core.arm_done(flight, now)
        if not f.acked:
            actions.append(Launch(f.source, f.command, f.decision, resend=True))
    return actions
