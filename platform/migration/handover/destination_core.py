"""The destination side of hand-overs as a sans-IO state machine: one object per node.

It runs a copy only under a lease renewed by the source's ticketed calls and enforced by the
runtime's fence, persists "owner at epoch e + 1" before it answers ``commit``, persists a
tombstone before it says a copy is dead, and fences everything uncommitted when it restarts
(:mod:`ownership` has the rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fogmig.platform.migration.handover.events import (
    Action,
    ArmFence,
    CallIn,
    CancelTimer,
    Event,
    FenceFired,
    Ids,
    LazyFinished,
    RunStep,
    RuntimeReport,
    SendReply,
    StartTimer,
    StepDone,
    StepKind,
    TimerFired,
    WriteJournal,
)
from fogmig.platform.migration.handover.journal import (
    AnyEntry,
    Boot,
    Committed,
    Floor,
    Prepared,
    Restoring,
    Tombstoned,
    incarnation,
)
from fogmig.platform.migration.handover.messages import (
    TOMBSTONES,
    Abort,
    AbortOk,
    ApplyDelta,
    ApplyDeltaOk,
    Commit,
    CommitOk,
    DestState,
    LazyStatus,
    LazyStatusOk,
    Prepare,
    PrepareOk,
    Refused,
    Reply,
    Request,
    Restore,
    RestoreOk,
    SendFiles,
    SendFilesOk,
    Status,
    StatusOk,
    Ticket,
    TicketedRequest,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.recovery import DestinationAction, recover_destination

SETTLED_STATES = frozenset({"committed", *TOMBSTONES})
ANSWERED_KEPT = 256


@dataclass(slots=True)
class Incoming:
    """One migration arriving at this node."""

    migration_id: str
    service: str
    epoch: int
    source: str
    state: DestState = "prepared"
    lazy: bool = False
    lazy_done: bool = False
    issued: dict[int, float] = field(default_factory=dict)
    """Tickets of this incarnation: sequence number -> when this node issued it."""
    lease_until: float = float("-inf")
    fence_at: float = float("-inf")
    """The deadline last armed in the runtime's fence."""
    applying: bool = False
    disarming: bool = False
    killed: bool = True
    """False while a kill is under way: a tombstone is only reported once the copy is dead."""
    waiters: list[tuple[int, str]] = field(default_factory=list)
    """Calls answered once the state settles (the copy dead, or this node the owner)."""

    @property
    def settled(self) -> bool:
        return self.state in SETTLED_STATES and self.killed and not self.disarming


class DestinationCore:
    """Decides every migration arriving at one node; see the module docstring."""

    def __init__(self, *, node: str, timing: Timing, ids: Ids, incarnation: int = 1) -> None:
        self.node = node
        self.timing = timing
        self.ids = ids
        self.incarnation = incarnation
        self.records: dict[str, Incoming] = {}
        self.owners: dict[str, int] = {}
        """Service -> the epoch at which this node became its owner, or the journal's floor
        for it if higher: no prepare at or below it is accepted."""
        self._seq = 0
        self._in_flight: set[int] = set()
        self._answered: dict[int, Reply | Refused] = {}
        """Recent replies by call id: a repeated call gets the same answer."""
        self._steps: dict[int, tuple[str, StepKind, int | None, Request | None]] = {}

    # ------------------------------------------------------------------ restart

    @classmethod
    def recover(
        cls,
        *,
        node: str,
        entries: Sequence[AnyEntry],
        runtime: Mapping[str, RuntimeReport],
        timing: Timing,
        ids: Ids,
    ) -> tuple[DestinationCore, list[Action]]:
        """Rebuild from the journal after a restart: keep what is committed, fence the rest."""
        core = cls(node=node, timing=timing, ids=ids, incarnation=incarnation(entries))
        actions: list[Action] = [WriteJournal(Boot(incarnation=core.incarnation))]
        for entry in entries:
            if isinstance(entry, Prepared):
                core.records[entry.migration_id] = Incoming(
                    migration_id=entry.migration_id,
                    service=entry.service,
                    epoch=entry.epoch,
                    source=entry.source,
                )
            if isinstance(entry, Tombstoned) and entry.migration_id not in core.records:
                # Aborted before it was prepared: the tombstone keeps a late prepare out.
                core.records[entry.migration_id] = Incoming(
                    migration_id=entry.migration_id, service="-", epoch=0, source="-"
                )
            if isinstance(entry, Floor):
                core._raise_owners(entry.epochs)
            rec = core.records.get(getattr(entry, "migration_id", ""))
            if rec is None or rec.state in SETTLED_STATES:
                continue
            if isinstance(entry, Committed):
                rec.state = "committed"
                core._raise_owners({entry.service: entry.epoch})
            elif isinstance(entry, Tombstoned):
                rec.state = entry.reason
        for plan in recover_destination(entries, runtime):
            rec = core.records[plan.migration_id]
            if plan.action is DestinationAction.FENCE:
                actions += core._tombstone(rec, "fenced", plan.reason, kill=plan.kill)
            elif plan.action is DestinationAction.CLEAN:
                if plan.kill:
                    actions += core._kill(rec)
                else:
                    actions.append(core._run("delete_files", rec))
            elif plan.action is DestinationAction.FORGET:
                if rec.state not in SETTLED_STATES:
                    actions += core._tombstone(rec, "fenced", plan.reason, kill=False)
                else:
                    actions.append(core._run("delete_files", rec))
        return core, actions

    # ------------------------------------------------------------------ compaction

    def in_use(self) -> set[str]:
        """Migrations the journal must keep whatever their entries say: a step of theirs is
        under way, a call waits for them, or they have not settled."""
        busy = {mid for mid, *_ in self._steps.values()}
        return busy | {mid for mid, rec in self.records.items() if rec.waiters or not rec.settled}

    def forget(self, dropped: Iterable[str], floor: Mapping[str, int]) -> None:
        """The journal dropped these (settled) migrations: forget them, and refuse any prepare
        at or below ``floor`` (a replay of one of them among others)."""
        for mid in dropped:
            self.records.pop(mid, None)
        self._raise_owners(floor)

    def _raise_owners(self, epochs: Mapping[str, int]) -> None:
        for service, epoch in epochs.items():
            if epoch > self.owners.get(service, -1):
                self.owners[service] = epoch

    # ------------------------------------------------------------------ events

    def handle(self, event: Event, now: float) -> list[Action]:
        """Advance on ``event`` (at ``now`` on this node's monotonic clock)."""
        if isinstance(event, CallIn):
            return self._on_call(event, now)
        if isinstance(event, StepDone):
            return self._on_step(event, now)
        if isinstance(event, TimerFired):
            mid = event.name.removeprefix("stale:")
            rec = self.records.get(mid)
            if rec is not None and rec.state == "prepared" and not rec.applying:
                return self._tombstone(rec, "stale", "the source fell silent", kill=False)
            return []
        if isinstance(event, FenceFired):
            rec = self.records.get(event.migration_id)
            if rec is not None and rec.state in ("restoring", "running") and not rec.disarming:
                return self._tombstone(rec, "fenced", "the lease ran out", kill=True)
            return []
        if isinstance(event, LazyFinished):
            rec = self.records.get(event.migration_id)
            if rec is None or rec.state != "running":
                return []
            if event.ok:
                rec.lazy_done = True
                return []
            return self._tombstone(rec, "fenced", f"lazy pages failed: {event.detail}", kill=True)
        return []

    def _on_call(self, call: CallIn, now: float) -> list[Action]:
        key = call.call_id
        if key in self._in_flight:
            return []  # a repeat of a call still being performed: one answer will do
        if key in self._answered:
            return [SendReply(key, self._answered[key])]
        self._in_flight.add(key)
        return self._dispatch(call, now)

    def _dispatch(self, call: CallIn, now: float) -> list[Action]:
        req = call.request
        if isinstance(req, Prepare):
            return self._prepare(call, req, now)
        mid = req.migration_id
        rec = self.records.get(mid)
        if rec is None:
            if isinstance(req, Abort):
                # Remember the refusal, so a late prepare can never bring it back.
                rec = Incoming(migration_id=mid, service="-", epoch=req.epoch, source=call.peer)
                self.records[mid] = rec
                aborted = AbortOk(migration_id=mid, outcome="aborted")
                return [
                    *self._tombstone(rec, "aborted", "aborted before prepare", kill=False),
                    self._reply(call.call_id, aborted),
                ]
            if isinstance(req, Status):
                return [self._reply(call.call_id, StatusOk(migration_id=mid, state="unknown"))]
            return [self._refuse(call.call_id, mid, "unknown", f"{self.node} has no {mid}")]
        if call.peer != rec.source:
            return [self._refuse(call.call_id, mid, "invalid", f"{mid} is not {call.peer}'s")]
        actions: list[Action] = []
        if isinstance(req, TicketedRequest):
            actions += self._renew(rec, req.ticket, now)
        if rec.state == "prepared":
            actions.append(StartTimer(f"stale:{mid}", self.timing.stale_timeout_s))
        if isinstance(req, Status):
            reply = StatusOk(migration_id=mid, state=rec.state, epoch=rec.epoch)
            return [*actions, self._reply(call.call_id, reply)]
        if isinstance(req, Abort):
            return actions + self._abort(rec, call.call_id)
        if isinstance(req, SendFiles | ApplyDelta):
            return actions + self._apply(rec, call.call_id, req)
        if isinstance(req, Restore):
            return actions + self._restore(rec, call.call_id, req, now)
        if isinstance(req, LazyStatus):
            if rec.state == "running":
                done = rec.lazy_done or not rec.lazy
                lazy = LazyStatusOk(migration_id=mid, ticket=self._ticket(rec, now), done=done)
                return [*actions, self._reply(call.call_id, lazy)]
            return actions + self._by_state(rec, call.call_id, req.op)
        if isinstance(req, Commit):
            return actions + self._commit(rec, call.call_id, req)
        return [*actions, self._refuse(call.call_id, mid, "invalid", f"{req.op} is not for here")]

    # ------------------------------------------------------------------ operations

    def _prepare(self, call: CallIn, req: Prepare, now: float) -> list[Action]:
        mid = req.migration_id
        rec = self.records.get(mid)
        if rec is not None:
            if rec.state == "prepared" and rec.source == call.peer and not rec.applying:
                reply = PrepareOk(migration_id=mid, ticket=self._ticket(rec, now), node=self.node)
                return [self._reply(call.call_id, reply)]
            return self._by_state(rec, call.call_id, req.op)
        if req.source != call.peer:
            return [self._refuse(call.call_id, mid, "invalid", "prepare names another source")]
        if req.epoch <= self.owners.get(req.service, -1):
            return [self._refuse(call.call_id, mid, "invalid", "a stale epoch")]
        if any(
            r.service == req.service and r.state in ("prepared", "restoring", "running")
            for r in self.records.values()
        ):
            return [self._refuse(call.call_id, mid, "busy", f"{req.service} is arriving")]
        rec = Incoming(migration_id=mid, service=req.service, epoch=req.epoch, source=call.peer)
        self.records[mid] = rec
        entry = Prepared(
            migration_id=mid,
            service=req.service,
            epoch=req.epoch,
            source=call.peer,
            technique=req.technique,
        )
        reply = PrepareOk(migration_id=mid, ticket=self._ticket(rec, now), node=self.node)
        return [
            WriteJournal(entry),
            StartTimer(f"stale:{mid}", self.timing.stale_timeout_s),
            self._reply(call.call_id, reply),
        ]

    def _apply(self, rec: Incoming, call_id: int, req: SendFiles | ApplyDelta) -> list[Action]:
        if rec.state != "prepared" or rec.applying:
            return self._by_state(rec, call_id, req.op)
        rec.applying = True
        return [self._run("apply", rec, call_id, req)]

    def _restore(self, rec: Incoming, call_id: int, req: Restore, now: float) -> list[Action]:
        if rec.state != "prepared" or rec.applying or req.epoch != rec.epoch:
            return self._by_state(rec, call_id, req.op)
        if rec.lease_until <= now:
            return [self._refuse(call_id, rec.migration_id, "lease_expired", "no valid ticket")]
        rec.state = "restoring"
        rec.lazy = req.mode == "lazy"
        rec.fence_at = rec.lease_until
        return [
            CancelTimer(f"stale:{rec.migration_id}"),
            WriteJournal(Restoring(migration_id=rec.migration_id)),
            ArmFence(rec.migration_id, rec.fence_at),
            self._run("restore", rec, call_id, req),
        ]

    def _commit(self, rec: Incoming, call_id: int, req: Commit) -> list[Action]:
        if req.epoch != rec.epoch:
            return [self._refuse(call_id, rec.migration_id, "invalid", "another epoch")]
        if rec.state == "prepared" and not rec.applying:
            # The source believes in a restore that never happened here: end it.
            rec.waiters.append((call_id, req.op))
            return self._tombstone(rec, "aborted", "commit without a restore", kill=False)
        if rec.state != "running" or rec.settled:
            return self._by_state(rec, call_id, req.op)
        if rec.lazy and not rec.lazy_done:
            return [self._refuse(call_id, rec.migration_id, "busy", "pages still arriving")]
        rec.waiters.append((call_id, req.op))
        if rec.disarming:
            return []
        rec.disarming = True
        return [self._run("disarm", rec)]

    def _abort(self, rec: Incoming, call_id: int) -> list[Action]:
        rec.waiters.append((call_id, "abort"))
        if rec.state in SETTLED_STATES or rec.disarming:
            return self._answer_waiters(rec)
        if rec.state == "prepared" and not rec.applying:
            return self._tombstone(rec, "aborted", "aborted by the source", kill=False)
        return self._tombstone(rec, "aborted", "aborted by the source", kill=True)

    # ------------------------------------------------------------------ steps

    def _on_step(self, done: StepDone, now: float) -> list[Action]:
        found = self._steps.pop(done.step_id, None)
        if found is None:
            return []
        mid, kind, call_id, request = found
        rec = self.records[mid]
        if kind == "apply":
            rec.applying = False
            if rec.state != "prepared" or call_id is None:
                return self._answer_waiters(rec)
            if not done.ok:
                return [self._refuse(call_id, mid, "invalid", done.detail)]
            reply: Reply = (
                SendFilesOk(migration_id=mid, ticket=self._ticket(rec, now))
                if isinstance(request, SendFiles)
                else ApplyDeltaOk(migration_id=mid, ticket=self._ticket(rec, now))
            )
            return [self._reply(call_id, reply)]
        if kind == "restore":
            assert call_id is not None
            if rec.state == "restoring" and done.ok:
                rec.state = "running"
                reply = RestoreOk(migration_id=mid, ticket=self._ticket(rec, now))
                return [self._reply(call_id, reply)]
            rec.waiters.append((call_id, "restore"))
            if rec.state == "restoring":
                return self._tombstone(rec, "fenced", f"restore failed: {done.detail}", kill=True)
            return self._answer_waiters(rec)
        if kind == "disarm":
            rec.disarming = False
            if done.ok and rec.state == "running":
                rec.state = "committed"
                self._raise_owners({rec.service: rec.epoch})
                entry = Committed(migration_id=mid, service=rec.service, epoch=rec.epoch)
                return [
                    WriteJournal(entry),
                    *self._answer_waiters(rec),
                    self._run("delete_files", rec),
                ]
            if rec.state == "running":
                return self._tombstone(rec, "fenced", "the fence fired first", kill=True)
            # A tombstone arrived while disarming; its kill is under way or done.
            return self._answer_waiters(rec)
        if kind == "kill":
            if not done.ok:
                return [self._run("kill", rec)]  # the copy must die: try again
            rec.killed = True
            return [*self._answer_waiters(rec), self._run("delete_files", rec)]
        return []

    # ------------------------------------------------------------------ helpers

    def _tombstone(
        self, rec: Incoming, reason: DestState, detail: str, *, kill: bool
    ) -> list[Action]:
        assert reason in TOMBSTONES
        rec.state = reason
        entry = Tombstoned(migration_id=rec.migration_id, reason=reason, detail=detail[:512])  # type: ignore[arg-type]
        actions: list[Action] = [CancelTimer(f"stale:{rec.migration_id}"), WriteJournal(entry)]
        if kill:
            return actions + self._kill(rec)
        return [*actions, *self._answer_waiters(rec), self._run("delete_files", rec)]

    def _kill(self, rec: Incoming) -> list[Action]:
        rec.killed = False
        return [self._run("kill", rec)]

    def _answer_waiters(self, rec: Incoming) -> list[Action]:
        if not rec.settled:
            return []
        waiters, rec.waiters = rec.waiters, []
        return [self._settled_reply(rec, call_id, op) for call_id, op in waiters]

    def _by_state(self, rec: Incoming, call_id: int, op: str) -> list[Action]:
        """Answer a call that does not fit the migration's state."""
        if rec.state in SETTLED_STATES:
            if rec.settled:
                return [self._settled_reply(rec, call_id, op)]
            rec.waiters.append((call_id, op))
            return []
        return [self._refuse(call_id, rec.migration_id, "busy", f"{op} while {rec.state}")]

    def _settled_reply(self, rec: Incoming, call_id: int, op: str) -> SendReply:
        mid = rec.migration_id
        if rec.state == "committed":
            if op == "commit":
                return self._reply(
                    call_id, CommitOk(migration_id=mid, epoch=rec.epoch, owner=self.node)
                )
            if op == "abort":
                return self._reply(
                    call_id, AbortOk(migration_id=mid, outcome="committed", epoch=rec.epoch)
                )
            return self._refuse(call_id, mid, "committed", f"{self.node} owns it")
        if op == "abort":
            return self._reply(call_id, AbortOk(migration_id=mid, outcome=rec.state))  # type: ignore[arg-type]
        return self._refuse(call_id, mid, rec.state, "")

    def _ticket(self, rec: Incoming, now: float) -> Ticket:
        self._seq += 1
        horizon = now - self.timing.fence_timeout_s
        rec.issued = {s: t for s, t in rec.issued.items() if t > horizon}
        rec.issued[self._seq] = now
        return Ticket(incarnation=self.incarnation, seq=self._seq)

    def _renew(self, rec: Incoming, ticket: Ticket | None, now: float) -> list[Action]:
        if ticket is None or ticket.incarnation != self.incarnation:
            return []
        issued = rec.issued.get(ticket.seq)
        if issued is None:
            return []
        rec.lease_until = max(rec.lease_until, self.lease_end(issued, now))
        if rec.state in ("restoring", "running") and rec.lease_until > rec.fence_at:
            rec.fence_at = rec.lease_until
            return [ArmFence(rec.migration_id, rec.fence_at)]
        return []

    def lease_end(self, issued: float, now: float) -> float:
        """Where a ticket issued at ``issued`` puts the lease (a method so a test can break it)."""
        return issued + self.timing.fence_timeout_s

    def _run(
        self, kind: StepKind, rec: Incoming, call_id: int | None = None, call: Request | None = None
    ) -> RunStep:
        step = self.ids.step()
        self._steps[step] = (rec.migration_id, kind, call_id, call)
        return RunStep(step, kind, rec.migration_id, call)

    def _reply(self, call_id: int, reply: Reply | Refused) -> SendReply:
        if call_id in self._in_flight:
            self._in_flight.discard(call_id)
            self._answered[call_id] = reply
            while len(self._answered) > ANSWERED_KEPT:
                del self._answered[next(iter(self._answered))]
        return SendReply(call_id, reply)

    def _refuse(self, call_id: int, mid: str, state: str, detail: str) -> SendReply:
        refusal = Refused(migration_id=mid, state=state, detail=detail[:512])  # type: ignore[arg-type]
        return self._reply(call_id, refusal)
