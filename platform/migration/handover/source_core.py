"""The source side of a hand-over as a sans-IO state machine: one object per migration.

It prepares the destination, runs the technique's data moves (opaque ``move`` steps), freezes,
sends ``restore`` and ``commit``, and settles every failure by the ownership rule of
:mod:`ownership`: it resumes its own copy only on proof that the destination cannot run the
service, and finishes every accepted migration with exactly one ``Finished`` entry and event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from fogmig.platform.base.vocabulary import Outcome, Technique, TerminalOutcome
from fogmig.platform.migration.handover.events import (
    Action,
    CallFailed,
    CancelTimer,
    Event,
    Ids,
    Publish,
    ReplyIn,
    RunStep,
    RuntimeReport,
    SendCall,
    StartTimer,
    StepDone,
    StepKind,
    TerminalEvent,
    TimerFired,
    WriteJournal,
)
from fogmig.platform.migration.handover.journal import (
    Begin,
    CommitSent,
    Finished,
    Freezing,
    HandedOver,
    MigrationEntry,
    Published,
    RestoreSent,
    Resuming,
)
from fogmig.platform.migration.handover.messages import (
    OPS,
    TOMBSTONES,
    Abort,
    AbortOk,
    ApplyDelta,
    Commit,
    CommitOk,
    LazyStatus,
    LazyStatusOk,
    Prepare,
    Refused,
    Reply,
    Request,
    Restore,
    SendFiles,
    Ticket,
    TicketedReply,
    TicketedRequest,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.recovery import SourceAction, recover_source

TIMERS = ("call", "poll", "retry", "fence")
FOLD_LEASE_SHARE = 4
"""The final data call rides with the restore only while the newest ticket is younger than
this share of the lease (a quarter: five seconds of the default twenty)."""


class SourcePhase(StrEnum):
    PREPARING = "preparing"
    LIVE = "live"  # data moves while the service runs here
    FREEZING = "freezing"
    FINAL = "final"  # data moves after the freeze
    RESTORING = "restoring"
    LAZY = "lazy"
    COMMITTING = "committing"
    SETTLING = "settling"  # failed after restore was sent: waiting for proof
    RESUMING = "resuming"
    CLEANING = "cleaning"  # handed over: deleting the copy here
    DONE = "done"


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """One accepted migration as the source core sees it."""

    migration_id: str
    service: str
    source: str
    destination: str
    technique: Technique
    epoch: int
    """The epoch at which this node owns the service now; the destination would own +1."""
    args: tuple[str, ...] = ()
    live_moves: bool = False
    """Whether data moves run before the freeze (pre-copy, hybrid)."""
    restore: Restore | None = None
    """The restore call (without ticket and epoch); ``None`` only for a recovered migration."""
    command_id: str | None = None
    """The command that asked for the migration (journaled, so a restart can name it)."""

    @property
    def lazy(self) -> bool:
        return self.restore is not None and self.restore.mode == "lazy"


class SourceCore:
    """Decides one outgoing migration; see the module docstring."""

    def __init__(self, *, plan: Plan, timing: Timing, ids: Ids) -> None:
        self.plan = plan
        self.timing = timing
        self.ids = ids
        self.phase = SourcePhase.PREPARING
        self.outcome: TerminalOutcome | None = None
        self.reason = ""
        self._pending: tuple[int, str] | None = None  # (call id, op) awaiting a reply
        self._step: int | None = None
        self._ticket: Ticket | None = None
        self._ticket_at: float | None = None
        self._restore_sent = False
        self._commit_sent = False
        self._fence_allowed = False
        self._resume_at: float | None = None
        self._more = False  # the last data move said another one follows
        self._restore_base: str | None = None  # the last data move's base for the restore

    # ------------------------------------------------------------------ entry points

    def start(self, now: float) -> list[Action]:
        """The migration was accepted: journal it and prepare the destination."""
        p = self.plan
        begin = Begin(
            migration_id=p.migration_id,
            service=p.service,
            epoch=p.epoch,
            destination=p.destination,
            technique=p.technique,
            command_id=p.command_id,
        )
        prepare = Prepare(
            migration_id=p.migration_id,
            service=p.service,
            epoch=p.epoch + 1,
            source=p.source,
            technique=p.technique,
            args=list(p.args),
        )
        return [WriteJournal(begin), *self._call(prepare)]

    @classmethod
    def recover(
        cls,
        *,
        entries: Sequence[MigrationEntry],
        runtime: RuntimeReport,
        source: str,
        timing: Timing,
        ids: Ids,
        now: float,
    ) -> tuple[SourceCore, list[Action]]:
        """Rebuild an outgoing migration after a restart and return what to do first."""
        begin = next(e for e in entries if isinstance(e, Begin))
        plan = Plan(
            migration_id=begin.migration_id,
            service=begin.service,
            source=source,
            destination=begin.destination,
            technique=begin.technique,
            epoch=begin.epoch,
            command_id=begin.command_id,
        )
        core = cls(plan=plan, timing=timing, ids=ids)
        decision = recover_source(entries, runtime)
        core._restore_sent = any(isinstance(e, RestoreSent) for e in entries)
        core._commit_sent = any(isinstance(e, CommitSent) for e in entries)
        actions: list[Action]
        if decision.action is SourceAction.NOTHING:
            core.phase = SourcePhase.DONE
            actions = []
        elif decision.action is SourceAction.PUBLISH:
            assert decision.outcome is not None
            core.phase = SourcePhase.DONE
            core.outcome = decision.outcome
            actions = core._publish(decision.outcome, decision.reason)
        elif decision.action is SourceAction.FINISH_HANDOVER:
            core.phase = SourcePhase.CLEANING
            actions = [core._run("delete_copy")]
        elif decision.action is SourceAction.RESUME:
            core.reason = decision.reason
            actions = core._abort_best_effort() if not core._restore_sent else []
            if decision.resuming_written:
                core.phase = SourcePhase.RESUMING
                actions.append(core._run("resume"))
            else:
                actions += core._resume(decision.reason)
        elif decision.action is SourceAction.SETTLE:
            core.reason = decision.reason
            # Every ticket this node ever received arrived before now.
            core._ticket_at = now
            actions = core._settle(now, fence_allowed=decision.fence_allowed)
        else:
            actions = core._finish(Outcome.FAILED_AFTER_COMMIT, decision.reason)
        return core, actions

    def handle(self, event: Event, now: float) -> list[Action]:
        """Advance on ``event`` (at ``now`` on this node's monotonic clock)."""
        if self.phase is SourcePhase.DONE:
            return []
        if isinstance(event, ReplyIn):
            return self._on_reply(event, now)
        if isinstance(event, CallFailed):
            if self._pending is None or self._pending[0] != event.call_id:
                return []
            op = self._pending[1]
            self._pending = None
            return [CancelTimer("call"), *self._failed(f"{op} failed: {event.detail}", now)]
        if isinstance(event, TimerFired):
            return self._on_timer(event.name, now)
        if isinstance(event, StepDone):
            if event.step_id != self._step:
                return []
            self._step = None
            return self._on_step(event, now)
        return []

    # ------------------------------------------------------------------ replies

    def _on_reply(self, event: ReplyIn, now: float) -> list[Action]:
        if self._pending is None or self._pending[0] != event.call_id:
            return []  # late, duplicated, or for a call already given up
        op = self._pending[1]
        reply = event.reply
        if not isinstance(reply, OPS[op].reply | Refused):
            return []
        self._pending = None
        actions: list[Action] = [CancelTimer("call")]
        if isinstance(reply, TicketedReply):
            self._ticket, self._ticket_at = reply.ticket, now
        if isinstance(reply, Refused):
            return actions + self._on_refused(op, reply, now)
        if isinstance(reply, CommitOk) or (
            isinstance(reply, AbortOk) and reply.outcome == "committed"
        ):
            return actions + self._handed_over()
        if isinstance(reply, AbortOk):
            return actions + self._resume(f"the destination answered abort: {reply.outcome}")
        return actions + self._advance(op, reply, now)

    def _on_refused(self, op: str, reply: Refused, now: float) -> list[Action]:
        detail = f"{op} refused: {reply.state}" + (f" ({reply.detail})" if reply.detail else "")
        if reply.state == "committed":
            return self._handed_over()
        if reply.state in TOMBSTONES:
            # Durable at the destination before it was sent: its copy can never run.
            self.reason = self.reason or detail
            return self._resume(f"the destination's copy is dead: {detail}")
        if self.phase is SourcePhase.SETTLING:
            return [StartTimer("retry", self.timing.retry_s)]
        return self._failed(detail, now)

    def _advance(self, op: str, reply: Reply, now: float) -> list[Action]:
        phase = self.phase
        if phase is SourcePhase.PREPARING:
            if self.plan.live_moves:
                self.phase = SourcePhase.LIVE
                return [self._run("move")]
            return self._freeze()
        if phase in (SourcePhase.LIVE, SourcePhase.FINAL):
            return self._after_move()
        if phase is SourcePhase.RESTORING:
            if self.plan.lazy:
                self.phase = SourcePhase.LAZY
                return [StartTimer("poll", self.timing.lazy_poll_s)]
            return self._commit()
        if phase is SourcePhase.LAZY:
            if isinstance(reply, LazyStatusOk) and reply.done:
                return self._commit()
            return [StartTimer("poll", self.timing.lazy_poll_s)]
        return []

    # ------------------------------------------------------------------ steps and timers

    def _on_step(self, done: StepDone, now: float) -> list[Action]:
        phase = self.phase
        if phase in (SourcePhase.LIVE, SourcePhase.FINAL):
            if not done.ok:
                return self._failed(f"data move failed: {done.detail}", now)
            self._more = done.more
            if done.base is not None:
                self._restore_base = done.base
            final = phase is SourcePhase.FINAL and not done.more
            if final and isinstance(done.call, SendFiles | ApplyDelta) and self._fresh(now):
                # The frozen service's last data goes with the restore: one round trip.
                return self._restore(prelude=done.call)
            if done.call is not None:
                return self._call(done.call)
            return self._after_move()
        if phase is SourcePhase.FREEZING:
            if not done.ok:
                return self._failed(f"freeze failed: {done.detail}", now)
            self.phase = SourcePhase.FINAL
            return [self._run("move")]
        if phase is SourcePhase.RESUMING:
            if done.ok:
                return self._finish(Outcome.ROLLED_BACK, self.reason)
            return self._finish(
                Outcome.FAILED_AFTER_COMMIT, f"{self.reason}; resume failed: {done.detail}"
            )
        if phase is SourcePhase.CLEANING:
            # The destination owns the service; a leftover here is only logged by the driver.
            return self._finish(Outcome.COMPLETED, "" if done.ok else f"cleanup: {done.detail}")
        return []

    def _on_timer(self, name: str, now: float) -> list[Action]:
        if name == "call" and self._pending is not None:
            op = self._pending[1]
            self._pending = None
            return self._failed(f"{op}: no reply within {self.timing.call_timeout_s:g} s", now)
        if name == "poll" and self.phase is SourcePhase.LAZY and self._pending is None:
            return self._call(LazyStatus(migration_id=self.plan.migration_id))
        if name == "retry" and self.phase is SourcePhase.SETTLING and self._pending is None:
            return self._call(self._settle_call())
        if name == "fence" and self.phase is SourcePhase.SETTLING:
            if self._resume_at is not None and now >= self._resume_at:
                return [CancelTimer("call"), *self._resume("the destination's fence has fired")]
            if self._resume_at is not None:
                return [StartTimer("fence", self._resume_at - now)]
        return []

    # ------------------------------------------------------------------ transitions

    def _after_move(self) -> list[Action]:
        if self._more:
            return [self._run("move")]
        if self.phase is SourcePhase.LIVE:
            return self._freeze()
        return self._restore()

    def _freeze(self) -> list[Action]:
        self.phase = SourcePhase.FREEZING
        return [WriteJournal(Freezing(migration_id=self.plan.migration_id)), self._run("freeze")]

    def _restore(self, prelude: SendFiles | ApplyDelta | None = None) -> list[Action]:
        assert self.plan.restore is not None
        self.phase = SourcePhase.RESTORING
        self._restore_sent = True
        update: dict[str, object] = {"epoch": self.plan.epoch + 1, "prelude": prelude}
        if self._restore_base is not None:
            update["base"] = self._restore_base
        restore = self.plan.restore.model_copy(update=update)
        return [
            WriteJournal(RestoreSent(migration_id=self.plan.migration_id)),
            *self._call(restore),
        ]

    def _commit(self) -> list[Action]:
        self.phase = SourcePhase.COMMITTING
        self._commit_sent = True
        commit = Commit(migration_id=self.plan.migration_id, epoch=self.plan.epoch + 1)
        return [WriteJournal(CommitSent(migration_id=self.plan.migration_id)), *self._call(commit)]

    def _failed(self, detail: str, now: float) -> list[Action]:
        """A call or step failed: settle according to how far the migration got."""
        self.reason = self.reason or detail
        if self.phase in (SourcePhase.SETTLING, SourcePhase.RESUMING, SourcePhase.CLEANING):
            if self.phase is SourcePhase.SETTLING:
                return [StartTimer("retry", self.timing.retry_s)]
            return []
        if not self._restore_sent:
            # No restore was ever sent, so no copy can run there: resume at once.
            return self._abort_best_effort() + self._resume(f"{detail} (restore never sent)")
        return self._settle(now, fence_allowed=not self._commit_sent)

    def _settle(self, now: float, *, fence_allowed: bool) -> list[Action]:
        self.phase = SourcePhase.SETTLING
        self._fence_allowed = fence_allowed and not self._commit_sent
        actions: list[Action] = [CancelTimer("poll")]
        if self._fence_allowed:
            assert self._ticket_at is not None
            self._resume_at = self.fence_deadline(self._ticket_at, now)
            actions.append(StartTimer("fence", max(0.0, self._resume_at - now)))
        return actions + self._call(self._settle_call())

    def _fresh(self, now: float) -> bool:
        """Whether the newest ticket leaves the restore most of its lease. A restore carries
        no fresher ticket than the last reply's, and a long final transfer (cold on a slow
        link) can outlast it: then the data call goes first and its reply renews the lease."""
        if self._ticket_at is None:
            return False
        return now - self._ticket_at <= self.timing.fence_timeout_s / FOLD_LEASE_SHARE

    def fence_deadline(self, newest_ticket_at: float, now: float) -> float:
        """When rule 3c lets this node resume (a method so a test can break it)."""
        return self.timing.source_resume_at(newest_ticket_at)

    def _settle_call(self) -> Request:
        mid, epoch = self.plan.migration_id, self.plan.epoch + 1
        if self._commit_sent:
            # Commit is idempotent and answered definitively: owner, or a tombstone.
            return Commit(migration_id=mid, epoch=epoch)
        return Abort(migration_id=mid, epoch=epoch, reason=self.reason[:512])

    def _abort_best_effort(self) -> list[Action]:
        """Tell the destination to drop its files; nothing waits for the answer."""
        abort = Abort(
            migration_id=self.plan.migration_id, epoch=self.plan.epoch + 1, reason=self.reason[:512]
        )
        return [SendCall(self.ids.call(), abort)]

    def _resume(self, proof: str) -> list[Action]:
        self.phase = SourcePhase.RESUMING
        self._pending = None
        entry = Resuming(migration_id=self.plan.migration_id, epoch=self.plan.epoch, reason=proof)
        actions: list[Action] = [CancelTimer(t) for t in TIMERS]
        return [*actions, WriteJournal(entry), self._run("resume")]

    def _handed_over(self) -> list[Action]:
        self.phase = SourcePhase.CLEANING
        self._pending = None
        entry = HandedOver(migration_id=self.plan.migration_id, epoch=self.plan.epoch + 1)
        actions: list[Action] = [CancelTimer(t) for t in TIMERS]
        return [*actions, WriteJournal(entry), self._run("delete_copy")]

    def _finish(self, outcome: TerminalOutcome, reason: str) -> list[Action]:
        self.phase = SourcePhase.DONE
        self.outcome = outcome
        self.reason = reason
        entry = Finished(migration_id=self.plan.migration_id, outcome=outcome, reason=reason[:512])
        return [WriteJournal(entry), *self._publish(outcome, reason)]

    def _publish(self, outcome: TerminalOutcome, reason: str) -> list[Action]:
        event = TerminalEvent(
            migration_id=self.plan.migration_id,
            service=self.plan.service,
            outcome=outcome,
            reason=reason,
        )
        return [Publish(event), WriteJournal(Published(migration_id=self.plan.migration_id))]

    # ------------------------------------------------------------------ helpers

    def _call(self, request: Request) -> list[Action]:
        if isinstance(request, TicketedRequest) and self.phase is not SourcePhase.SETTLING:
            # Settling calls carry no ticket: they must not renew the lease we wait out.
            request = request.model_copy(update={"ticket": self._ticket})
        call_id = self.ids.call()
        self._pending = (call_id, request.op)
        return [SendCall(call_id, request), StartTimer("call", self.timing.call_timeout_s)]

    def _run(self, kind: StepKind) -> RunStep:
        self._step = self.ids.step()
        return RunStep(self._step, kind, self.plan.migration_id)
