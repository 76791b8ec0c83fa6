"""What the sans-IO handover cores take (events) and what they ask for (actions).

A driver feeds events with the node's monotonic time and executes the returned actions in
order. :class:`WriteJournal` and :class:`ArmFence` are on disk (or in the runtime) before the
next action starts; :class:`RunStep` starts a runtime step whose end comes back as
:class:`StepDone`; calls and replies are sent without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fogmig.platform.base.vocabulary import TerminalOutcome
from fogmig.platform.migration.handover.journal import AnyEntry
from fogmig.platform.migration.handover.messages import Refused, Reply, Request, TicketedRequest

StepKind = Literal[
    # source
    "move",  # technique data move (dump round, delta, files); may yield a call to make
    "freeze",  # freeze and dump the service: its copy here stops
    "resume",  # make the copy here run again (thaw, or restore from its own image)
    "delete_copy",  # after the hand-over: delete the stopped copy and its image
    # destination
    "apply",  # perform a data-moving call (apply a delta, check streamed files)
    "restore",  # restore under the armed fence; the copy runs only if the fence has not fired
    "kill",  # fire the fence now: kill the copy, never let it run again
    "disarm",  # disarm the fence; fails if it already fired
    "delete_files",  # remove the migration's directory and bundle leftovers
]


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallIn:
    """A call arrived from ``peer`` (at the destination).

    ``call_id`` is unique on this node while the call may be repeated: the driver numbers
    calls per connection and keeps the numbers of different peers and restarts apart.
    """

    call_id: int
    request: Request
    peer: str


@dataclass(frozen=True, slots=True)
class ReplyIn:
    """A reply arrived (at the source)."""

    call_id: int
    reply: Reply | Refused


@dataclass(frozen=True, slots=True)
class CallFailed:
    """The transport gave up on a call (link down, peer refused the connection)."""

    call_id: int
    detail: str


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str


@dataclass(frozen=True, slots=True)
class StepDone:
    """A runtime step ended; a ``move`` may hand back the call that confirms it."""

    step_id: int
    ok: bool
    detail: str = ""
    call: TicketedRequest | None = None
    more: bool = False
    base: str | None = None
    """Set by the last data move: the image set the restore builds on (the plan's otherwise)."""


@dataclass(frozen=True, slots=True)
class FenceFired:
    """The runtime's fence of an incoming migration fired (at the destination)."""

    migration_id: str


@dataclass(frozen=True, slots=True)
class LazyFinished:
    """The lazy page transfer of an incoming migration ended (at the destination)."""

    migration_id: str
    ok: bool
    detail: str = ""


Event = CallIn | ReplyIn | CallFailed | TimerFired | StepDone | FenceFired | LazyFinished


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendCall:
    call_id: int
    request: Request


@dataclass(frozen=True, slots=True)
class SendReply:
    call_id: int
    reply: Reply | Refused


@dataclass(frozen=True, slots=True)
class StartTimer:
    """(Re)start timer ``name``; it fires ``delay_s`` from now unless cancelled."""

    name: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class RunStep:
    step_id: int
    kind: StepKind
    migration_id: str
    call: Request | None = None


@dataclass(frozen=True, slots=True)
class WriteJournal:
    entry: AnyEntry


@dataclass(frozen=True, slots=True)
class ArmFence:
    """Arm (or push out) the runtime's fence of an incoming copy to ``deadline``.

    ``deadline`` is on this node's monotonic clock; the fence never moves earlier and a
    fired fence stays fired. It must outlive the agent: a crash leaves it armed.
    """

    migration_id: str
    deadline: float


@dataclass(frozen=True, slots=True)
class TerminalEvent:
    """What the bus hears once per accepted migration."""

    migration_id: str
    service: str
    outcome: TerminalOutcome
    reason: str


@dataclass(frozen=True, slots=True)
class Publish:
    event: TerminalEvent


Action = (
    SendCall | SendReply | StartTimer | CancelTimer | RunStep | WriteJournal | ArmFence | Publish
)


@dataclass(frozen=True, slots=True)
class RuntimeReport:
    """What the runtime says about a service's copy on this node after a restart."""

    container: Literal["running", "paused", "absent"]
    image: bool = False
    """Whether this migration's image (or directory) is still on disk."""


@dataclass(slots=True)
class Ids:
    """Call and step numbers; a restarted agent starts from a new base so none is reused."""

    next_call: int = 1
    next_step: int = 1

    def call(self) -> int:
        self.next_call += 1
        return self.next_call - 1

    def step(self) -> int:
        self.next_step += 1
        return self.next_step - 1
