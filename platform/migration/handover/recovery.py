"""What a restarted agent does about each migration its journal leaves unfinished (pure).

:func:`recover_source` and :func:`recover_destination` read one migration's journal entries
and what the runtime reports now, and name the action; the protocol cores carry it out. The
decisions follow the ownership rule in :mod:`ownership`; docs/handover.md has the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from fogmig.platform.base.vocabulary import TerminalOutcome
from fogmig.platform.migration.handover.events import RuntimeReport
from fogmig.platform.migration.handover.journal import (
    AnyEntry,
    Begin,
    CommitSent,
    Committed,
    Finished,
    Freezing,
    HandedOver,
    MigrationEntry,
    Prepared,
    Published,
    RestoreSent,
    Restoring,
    Resuming,
    Tombstoned,
)


class SourceAction(StrEnum):
    NOTHING = "nothing"  # finished and published
    PUBLISH = "publish"  # finished: publish the terminal event again
    FINISH_HANDOVER = "finish_handover"  # handed over: delete the copy here, finish completed
    RESUME = "resume"  # proven safe: resume the copy here, finish rolled back
    SETTLE = "settle"  # in doubt: ask the destination until it answers (or the fence proves)
    LOST = "lost"  # no copy and no image here, never sent: finish failed


@dataclass(frozen=True, slots=True)
class SourceRecovery:
    action: SourceAction
    reason: str
    fence_allowed: bool = False
    """SETTLE only: whether the fence (rule 3c) may settle it (``commit`` never sent)."""
    outcome: TerminalOutcome | None = None
    """PUBLISH only: the outcome already decided."""
    resuming_written: bool = False
    """RESUME only: ``Resuming`` is already in the journal."""


def recover_source(entries: Sequence[MigrationEntry], runtime: RuntimeReport) -> SourceRecovery:
    """The recovery of one outgoing migration from its entries and the copy's state here."""
    kinds = {type(e) for e in entries}
    finished = [e for e in entries if isinstance(e, Finished)]
    if finished:
        if Published in kinds:
            return SourceRecovery(action=SourceAction.NOTHING, reason="finished")
        return SourceRecovery(
            action=SourceAction.PUBLISH, reason=finished[0].reason, outcome=finished[0].outcome
        )
    if HandedOver in kinds:
        return SourceRecovery(
            action=SourceAction.FINISH_HANDOVER, reason="the destination acknowledged commit"
        )
    resumable = runtime.container != "absent" or runtime.image
    if Resuming in kinds:
        reason = next(e.reason for e in entries if isinstance(e, Resuming))
        if not resumable:
            return SourceRecovery(
                action=SourceAction.LOST, reason=f"resuming ({reason}) but no copy or image"
            )
        return SourceRecovery(action=SourceAction.RESUME, reason=reason, resuming_written=True)
    if CommitSent in kinds:
        return SourceRecovery(action=SourceAction.SETTLE, reason="restarted after sending commit")
    if RestoreSent in kinds:
        return SourceRecovery(
            action=SourceAction.SETTLE,
            reason="restarted after sending restore",
            fence_allowed=True,
        )
    if not resumable:
        return SourceRecovery(
            action=SourceAction.LOST, reason="restarted with neither the copy nor its image"
        )
    what = "frozen" if Freezing in kinds else "still running"
    return SourceRecovery(
        action=SourceAction.RESUME, reason=f"restarted before restore was sent ({what})"
    )


class DestinationAction(StrEnum):
    KEEP = "keep"  # committed and running: this node owns the service
    LOST = "lost"  # committed but the copy is gone: keep the image, alert the operator
    FENCE = "fence"  # not committed: tombstone, kill any copy, delete files
    CLEAN = "clean"  # tombstoned already: kill any copy it left, delete files
    FORGET = "forget"  # superseded by a later migration of the same service: delete files


@dataclass(frozen=True, slots=True)
class DestinationRecovery:
    migration_id: str
    service: str
    action: DestinationAction
    reason: str
    kill: bool = False
    """Whether a copy of this migration may be present and must be killed."""


def recover_destination(
    entries: Sequence[AnyEntry], runtime: Mapping[str, RuntimeReport]
) -> list[DestinationRecovery]:
    """The recovery of every incoming migration in a destination's journal.

    ``runtime`` reports each service's copy here. Only the latest migration of a service may
    touch its container: an earlier one that was aborted must not kill a later committed copy.
    """
    services: dict[str, str] = {}
    order: list[str] = []
    states: dict[str, MigrationEntry] = {}
    for entry in entries:
        if isinstance(entry, Prepared):
            services[entry.migration_id] = entry.service
            order.append(entry.migration_id)
        if isinstance(entry, Prepared | Restoring | Committed | Tombstoned):
            last = states.get(entry.migration_id)
            # A tombstone or commit is final; later entries never override it.
            if not isinstance(last, Committed | Tombstoned):
                states[entry.migration_id] = entry
    latest = {services[mid]: mid for mid in order}
    plans: list[DestinationRecovery] = []
    for mid in order:
        service = services[mid]
        report = runtime.get(service, RuntimeReport(container="absent"))
        state = states[mid]
        present = report.container != "absent"
        if latest[service] != mid:
            plans.append(
                DestinationRecovery(
                    migration_id=mid,
                    service=service,
                    action=DestinationAction.FORGET,
                    reason="a later migration of the service supersedes it",
                )
            )
        elif isinstance(state, Committed):
            plans.append(
                DestinationRecovery(
                    migration_id=mid,
                    service=service,
                    action=DestinationAction.KEEP if present else DestinationAction.LOST,
                    reason=f"owner at epoch {state.epoch}"
                    + ("" if present else ", but its copy is gone"),
                )
            )
        elif isinstance(state, Tombstoned):
            plans.append(
                DestinationRecovery(
                    migration_id=mid,
                    service=service,
                    action=DestinationAction.CLEAN,
                    reason=f"tombstoned ({state.reason})",
                    kill=present,
                )
            )
        else:
            plans.append(
                DestinationRecovery(
                    migration_id=mid,
                    service=service,
                    action=DestinationAction.FENCE,
                    reason="restarted before commit",
                    kill=present or isinstance(state, Restoring),
                )
            )
    return plans


def begin_of(entries: Sequence[MigrationEntry]) -> Begin | None:
    """The ``Begin`` entry of an outgoing migration, if the entries are one."""
    return next((e for e in entries if isinstance(e, Begin)), None)
