"""A model test of the real handover cores over a hostile simulated network and runtime.

Each seeded schedule migrates one service from ``src`` to ``dst`` while the network drops,
delays (past the fence timeout), duplicates and reorders every call and reply, cuts the link
for a while, and either agent crashes at any action and restarts from its journal. The runtime
outlives the agents (containers and the fence keep going). At every simulated instant at most
one copy runs; at the end exactly one runs, it carries the state of the last owner, and every
accepted migration has exactly one terminal outcome, published.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from fogmig.platform.base.vocabulary import Technique
from fogmig.platform.migration.handover import journal as j
from fogmig.platform.migration.handover.destination_core import DestinationCore
from fogmig.platform.migration.handover.events import (
    Action,
    ArmFence,
    CallIn,
    CancelTimer,
    Event,
    FenceFired,
    Ids,
    LazyFinished,
    Publish,
    ReplyIn,
    RunStep,
    RuntimeReport,
    SendCall,
    SendReply,
    StartTimer,
    StepDone,
    TimerFired,
    WriteJournal,
)
from fogmig.platform.migration.handover.messages import ApplyDelta, Restore, SendFiles
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.source_core import Plan, SourceCore, SourcePhase

TIMING = Timing(
    fence_timeout_s=20.0,
    margin_s=2.0,
    call_timeout_s=10.0,
    retry_s=1.0,
    stale_timeout_s=100.0,
    lazy_poll_s=0.5,
)
KILL_LATENCY = 1.0  # a fired fence takes up to this long to kill: the margin covers it
CHAOS_UNTIL = 200.0
HORIZON = 3000.0
MID = "svc-1"
SERVICE = "svc"


class Violation(AssertionError):
    """An invariant of the ownership rule does not hold."""


@dataclass
class Faults:
    drop: float = 0.0
    dup: float = 0.0
    slow: float = 0.0  # chance that a message is held far longer than the fence timeout
    crash: float = 0.0  # chance of a crash before each action an agent executes
    partitions: int = 0
    crash_at: tuple[str, int] | None = None  # crash that node before its n-th action


@dataclass
class Copy:
    """A running (or stopped) container of the service; its counter advances while it runs."""

    lineage: str
    base: int
    since: float
    running: bool = True

    def value(self, t: float) -> int:
        return self.base + (int(t - self.since) if self.running else 0)

    def stop(self, t: float) -> None:
        self.base, self.running = self.value(t), False


@dataclass
class Agent:
    name: str
    offset: float
    up: bool = True
    incarnation: int = 0
    journal: list[j.AnyEntry] = field(default_factory=list)
    timers: dict[str, int] = field(default_factory=dict)
    steps: dict[int, tuple[int, RunStep]] = field(default_factory=dict)
    executed: int = 0
    core: Any = None


class Sim:
    def __init__(
        self,
        seed: int,
        *,
        technique: str,
        faults: Faults,
        source_cls: type[SourceCore] = SourceCore,
        dest_cls: type[DestinationCore] = DestinationCore,
    ) -> None:
        self.rng = random.Random(seed)
        self.faults = faults
        self.technique = technique
        self.source_cls = source_cls
        self.dest_cls = dest_cls
        self.t = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.src = Agent("src", offset=self.rng.uniform(0, 1e4))
        self.dst = Agent("dst", offset=self.rng.uniform(0, 1e4))
        self.copies: dict[str, Copy | None] = {"src": Copy("src", 0, 0.0), "dst": None}
        self.image: int | None = None  # the source's frozen state
        self.dst_copy_mid: str | None = None
        self.fence: dict[str, Any] = {"deadline": float("-inf"), "armed": False, "fired": False}
        self.published: list[tuple[str, str]] = []
        self.live_rounds = self.rng.randint(1, 3)
        self.rounds = 0
        self.committed_value: int | None = None
        self.partitions = [
            (start, start + self.rng.uniform(5, 60))
            for start in (self.rng.uniform(0, 60) for _ in range(faults.partitions))
        ]

    # ------------------------------------------------------------------ engine

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (self.t + max(0.0, delay), next(self.seq), fn))

    def run(self) -> None:
        plan = Plan(
            migration_id=MID,
            service=SERVICE,
            source="src",
            destination="dst",
            technique=self.technique,  # type: ignore[arg-type]
            epoch=1,
            live_moves=self.technique in ("precopy", "hybrid"),
            restore=Restore(
                migration_id=MID,
                epoch=0,
                mode="lazy" if self.technique in ("postcopy", "hybrid") else "full",
                images="final",
            ),
        )
        self.src.core = self.source_cls(plan=plan, timing=TIMING, ids=Ids())
        self.dst.core = self.dest_cls(node="dst", timing=TIMING, ids=Ids())
        self.execute(self.src, self.src.core.start(self.now(self.src)))
        while self.queue:
            self.t, _, fn = heapq.heappop(self.queue)
            if self.t > HORIZON:
                raise Violation(f"no quiescence by t={HORIZON}: {self.describe()}")
            fn()
            self.check_instant()
        self.check_end()

    def now(self, agent: Agent) -> float:
        return self.t + agent.offset

    def chaos(self) -> bool:
        return self.t < CHAOS_UNTIL

    # ------------------------------------------------------------------ agents

    def feed(self, agent: Agent, event: Event) -> None:
        if agent.up:
            self.execute(agent, agent.core.handle(event, self.now(agent)))

    def execute(self, agent: Agent, actions: list[Action]) -> None:
        for action in actions:
            agent.executed += 1
            if not agent.up:
                return
            if self.faults.crash_at == (agent.name, agent.executed) or (
                self.chaos() and self.rng.random() < self.faults.crash
            ):
                self.crash(agent)
                return
            self.perform(agent, action)

    def perform(self, agent: Agent, action: Action) -> None:
        if isinstance(action, WriteJournal):
            agent.journal.append(action.entry)
        elif isinstance(action, SendCall):
            self.send(self.dst, lambda a=action: CallIn(a.call_id, a.request, "src"))
        elif isinstance(action, SendReply):
            self.send(self.src, lambda a=action: ReplyIn(a.call_id, a.reply))
        elif isinstance(action, StartTimer):
            token = agent.timers[action.name] = next(self.seq)
            inc = agent.incarnation
            self.at(action.delay_s, lambda: self.fire_timer(agent, action.name, token, inc))
        elif isinstance(action, CancelTimer):
            agent.timers.pop(action.name, None)
        elif isinstance(action, RunStep):
            agent.steps[action.step_id] = (agent.incarnation, action)
            self.at(self.step_time(action), lambda: self.finish_step(agent, action.step_id))
        elif isinstance(action, ArmFence):
            self.arm_fence(action.deadline)
        elif isinstance(action, Publish):
            self.published.append((action.event.migration_id, action.event.outcome))
        else:  # pragma: no cover
            raise AssertionError(action)

    def send(self, to: Agent, make: Callable[[], Event]) -> None:
        if self.chaos():
            if self.rng.random() < self.faults.drop:
                return
            if any(a <= self.t < b for a, b in self.partitions):
                return
        copies = 2 if self.chaos() and self.rng.random() < self.faults.dup else 1
        for _ in range(copies):
            delay = self.rng.uniform(0.005, 0.3)
            if self.chaos() and self.rng.random() < self.faults.slow:
                delay = self.rng.uniform(5, 60)
            inc = to.incarnation
            event = make()
            # A message to a restarted agent's new connection never comes from the old one.
            self.at(delay, lambda ev=event, i=inc: self.deliver(to, ev, i))

    def deliver(self, to: Agent, event: Event, incarnation: int) -> None:
        if isinstance(event, ReplyIn) and incarnation != to.incarnation:
            return
        self.feed(to, event)

    def fire_timer(self, agent: Agent, name: str, token: int, incarnation: int) -> None:
        if agent.up and agent.incarnation == incarnation and agent.timers.get(name) == token:
            del agent.timers[name]
            self.feed(agent, TimerFired(name))

    def crash(self, agent: Agent) -> None:
        agent.up = False
        agent.incarnation += 1
        agent.timers.clear()
        # A runtime step under way either finishes without the agent or dies with it.
        for step_id in list(agent.steps):
            if self.rng.random() < 0.5:
                del agent.steps[step_id]
        down = self.rng.uniform(0.1, 40.0)
        self.at(down, lambda: self.restart(agent))

    def restart(self, agent: Agent) -> None:
        agent.up = True
        base = agent.incarnation * 1_000_000
        ids = Ids(next_call=base, next_step=base)
        now = self.now(agent)
        if agent is self.src:
            entries = j.by_migration(agent.journal).get(MID, [])
            if not any(isinstance(e, j.Begin) for e in entries):
                agent.core = None  # never accepted: nothing to recover
                return
            copy = self.copies["src"]
            report = RuntimeReport(
                container="running" if copy and copy.running else "absent",
                image=self.image is not None,
            )
            agent.core, actions = self.source_cls.recover(
                entries=entries, runtime=report, source="src", timing=TIMING, ids=ids, now=now
            )
        else:
            copy = self.copies["dst"]
            reports = {
                SERVICE: RuntimeReport(container="running" if copy and copy.running else "absent")
            }
            agent.core, actions = self.dest_cls.recover(
                node="dst", entries=agent.journal, runtime=reports, timing=TIMING, ids=ids
            )
        self.execute(agent, actions)

    # ------------------------------------------------------------------ runtime

    def step_time(self, step: RunStep) -> float:
        if step.kind == "restore" and self.rng.random() < 0.1:
            return self.rng.uniform(15, 40)  # a restore that outlasts the fence
        return self.rng.uniform(0.05, 3.0)

    def finish_step(self, agent: Agent, step_id: int) -> None:
        found = agent.steps.pop(step_id, None)
        if found is None:
            return
        incarnation, step = found
        done = self.apply_step(agent, step)
        if agent.up and agent.incarnation == incarnation:
            self.feed(agent, done)

    def apply_step(self, agent: Agent, step: RunStep) -> StepDone:
        t, kind, sid = self.t, step.kind, step.step_id
        if kind == "move":
            live = self.src.core is not None and self.src.core.phase is SourcePhase.LIVE
            self.rounds += 1
            more = live and self.rounds < self.live_rounds
            name = f"r{self.rounds}"
            call = (
                ApplyDelta(migration_id=MID, base=name, delta=name, out=name)
                if live
                else SendFiles(migration_id=MID, name="final", files=3, bytes=4096)
            )
            return StepDone(sid, True, call=call, more=more)
        if kind == "freeze":
            copy = self.copies["src"]
            if copy is not None and copy.running:
                copy.stop(t)
                self.image = copy.value(t)
                self.copies["src"] = None
            return StepDone(sid, self.image is not None)
        if kind == "resume":
            copy = self.copies["src"]
            if copy is not None and copy.running:
                return StepDone(sid, True)
            if self.image is None:
                return StepDone(sid, False, "no image")
            self.copies["src"] = Copy("src", self.image, t)
            return StepDone(sid, True)
        if kind == "delete_copy":
            self.copies["src"] = None
            self.image = None
            return StepDone(sid, True)
        if kind in ("apply", "delete_files"):
            return StepDone(sid, True)
        if kind == "restore":
            assert self.image is not None, "restore before the freeze"
            if self.fence["fired"] or not self.fence["armed"]:
                return StepDone(sid, False, "fenced")
            self.copies["dst"] = Copy("dst", self.image, t)
            self.dst_copy_mid = step.migration_id
            assert isinstance(step.call, Restore)
            if step.call.mode == "lazy":
                ok = self.rng.random() < 0.9
                self.at(self.rng.uniform(1, 30), lambda: self.lazy_done(step.migration_id, ok))
            return StepDone(sid, True)
        if kind == "kill":
            self.fence["fired"] = True
            self.kill_dst()
            return StepDone(sid, True)
        if kind == "disarm":
            if self.fence["fired"]:
                return StepDone(sid, False, "fired")
            self.fence["armed"] = False
            copy = self.copies["dst"]
            self.committed_value = copy.value(t) if copy else None
            return StepDone(sid, True)
        raise AssertionError(kind)

    def kill_dst(self) -> None:
        copy = self.copies["dst"]
        if copy is not None:
            copy.stop(self.t)
            self.copies["dst"] = None

    def arm_fence(self, deadline: float) -> None:
        fence = self.fence
        if fence["fired"]:
            return
        if fence["armed"] and deadline <= fence["deadline"]:
            return
        fence["armed"], fence["deadline"] = True, deadline
        self.at(deadline - self.dst.offset - self.t, lambda d=deadline: self.fence_due(d))

    def fence_due(self, deadline: float) -> None:
        fence = self.fence
        if not fence["armed"] or fence["fired"] or fence["deadline"] != deadline:
            return
        fence["fired"] = True
        self.at(self.rng.uniform(0, KILL_LATENCY), self.fence_kill)

    def fence_kill(self) -> None:
        self.kill_dst()
        self.feed(self.dst, FenceFired(MID))

    def lazy_done(self, mid: str, ok: bool) -> None:
        copy = self.copies["dst"]
        if copy is not None and copy.running:
            self.feed(self.dst, LazyFinished(mid, ok, "" if ok else "page source failed"))

    # ------------------------------------------------------------------ invariants

    def describe(self) -> str:
        return (
            f"t={self.t:.2f} copies={self.copies} fence={self.fence} "
            f"src={[e.kind for e in self.src.journal]} dst={[e.kind for e in self.dst.journal]}"
        )

    def check_instant(self) -> None:
        running = [n for n, c in self.copies.items() if c is not None and c.running]
        if len(running) > 1:
            raise Violation(f"two live copies: {self.describe()}")

    def check_end(self) -> None:
        running = [n for n, c in self.copies.items() if c is not None and c.running]
        if len(running) != 1:
            raise Violation(f"{len(running)} copies run at the end: {self.describe()}")
        where = running[0]
        final = self.copies[where]
        assert final is not None
        src_entries = [e for e in self.src.journal if isinstance(e, j.MigrationEntry)]
        finished = [e for e in src_entries if isinstance(e, j.Finished)]
        committed = any(isinstance(e, j.Committed) for e in self.dst.journal)
        if not any(isinstance(e, j.Begin) for e in src_entries):
            if where != "src" or finished or committed:
                raise Violation(f"a migration never accepted moved: {self.describe()}")
            return
        if len(finished) != 1:
            raise Violation(f"{len(finished)} terminal outcomes: {self.describe()}")
        outcome = finished[0].outcome
        if not self.published or {o for _, o in self.published} != {outcome}:
            raise Violation(f"published {self.published}, finished {outcome}")
        if outcome == "completed":
            if where != "dst" or not committed:
                raise Violation(f"completed, but the service is on {where}: {self.describe()}")
            assert self.committed_value is not None
            if final.value(self.t) < self.committed_value:
                raise Violation("the owner's state went back")
        elif outcome == "rolled_back":
            if where != "src" or committed:
                raise Violation(f"rolled back, but {where} runs it: {self.describe()}")
        else:
            raise Violation(f"failed: {finished[0].reason}: {self.describe()}")
        if self.image is not None and final.value(self.t) < self.image:
            raise Violation("the running copy lost state it had when frozen")
        self.outcome = outcome

    outcome = ""


TECHNIQUES = tuple(Technique)


def _faults(rng: random.Random) -> Faults:
    if rng.random() < 0.2:
        return Faults()
    return Faults(
        drop=rng.choice((0.0, 0.02, 0.1, 0.3)),
        dup=rng.choice((0.0, 0.1)),
        slow=rng.choice((0.0, 0.02, 0.1)),
        crash=rng.choice((0.0, 0.0, 0.01, 0.04)),
        partitions=rng.choice((0, 0, 1, 2)),
    )


def run_random(
    seeds: range,
    source_cls: type[SourceCore] = SourceCore,
    dest_cls: type[DestinationCore] = DestinationCore,
) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for seed in seeds:
        rng = random.Random(seed)
        sim = Sim(
            seed,
            technique=TECHNIQUES[seed % 4],
            faults=_faults(rng),
            source_cls=source_cls,
            dest_cls=dest_cls,
        )
        try:
            sim.run()
        except Violation as exc:
            raise Violation(f"seed {seed}: {exc}") from None
        outcomes[sim.outcome or "not_accepted"] = outcomes.get(sim.outcome or "not_accepted", 0) + 1
    return outcomes


def test_random_schedules_keep_one_owner() -> None:
    outcomes = run_random(range(10000))
    # The schedules reach every end, or they would prove little.
    assert outcomes.get("completed", 0) > 2000
    assert outcomes.get("rolled_back", 0) > 2000


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_a_crash_at_every_action_of_either_agent(technique: str) -> None:
    clean = Sim(0, technique=technique, faults=Faults())
    clean.run()
    assert clean.outcome == "completed"
    ends: set[str] = set()
    for name, total in (("src", clean.src.executed), ("dst", clean.dst.executed)):
        for n in range(1, total + 2):
            for seed in range(3):
                sim = Sim(seed, technique=technique, faults=Faults(crash_at=(name, n)))
                try:
                    sim.run()
                except Violation as exc:
                    raise Violation(f"{name} crashing at action {n} (seed {seed}): {exc}") from None
                ends.add(sim.outcome)
    assert {"completed", "rolled_back"} <= ends


class ImpatientSource(SourceCore):
    """Resumes as soon as it gives up, without waiting for the destination's fence."""

    def fence_deadline(self, newest_ticket_at: float, now: float) -> float:
        return now


class ReceiptLeaseDestination(DestinationCore):
    """Runs its lease from when a call arrived: a call held by the network stretches it."""

    def lease_end(self, issued: float, now: float) -> float:
        return now + self.timing.fence_timeout_s


@pytest.mark.parametrize(
    ("source_cls", "dest_cls"),
    [(ImpatientSource, DestinationCore), (SourceCore, ReceiptLeaseDestination)],
)
def test_the_model_catches_a_broken_rule(
    source_cls: type[SourceCore], dest_cls: type[DestinationCore]
) -> None:
    with pytest.raises(Violation, match="two live copies"):
        run_random(range(3000), source_cls=source_cls, dest_cls=dest_cls)
