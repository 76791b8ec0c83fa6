"""The MQTT bus's wire contract: one versioned topic tree and a typed pydantic model per payload.

Pure values, no I/O: :func:`encode` and :func:`decode` turn a topic and a model into bytes and
back, and reject anything malformed, oversized, of an unknown version or kind, addressed to the
wrong topic or naming an unknown node with a :class:`SchemaError` that says why.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from fogmig.platform.base.nodes import NODE_NAME, SERVICE_NAME
from fogmig.platform.base.vocabulary import NodeCapabilities, Outcome, Phase, Technique
from fogmig.platform.bus.topics import (
    DEVICE_NAME_PATTERN,
    Rejection,
    SchemaError,
    TopicKind,
    TopicRef,
    parse_topic,
)
from fogmig.platform.migration.record import MigrationRecord
from fogmig.policies.conditions import InvalidConditionsError, PrecopyStopRules

VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024


# --- field types -------------------------------------------------------------------------


def _check_ip(value: str) -> str:
    return str(ipaddress.ip_address(value))


# Every number on the bus is finite and bounded by what its consumers can compute with: an
# integer beyond 2**53 is not exact as a float (and one beyond ~1e308 does not convert at all),
# a rate of 1e308 turns the cost model's products into infinities.
MAX_INT = 2**53
MAX_BYTES = 2**53
"""Sizes in bytes (8 PiB)."""
MAX_RATE = 1e12
"""Rates in bytes per second (8 Tbit/s)."""
MAX_RTT_S = 3600.0
MAX_UNIX_TIME = float(2**32)
"""Timestamps: seconds since 1970, up to the year 2106."""
MAX_LOAD = 1e6
MAX_LIST = 256
"""Entries of a list in a payload (services or links of a node)."""

# Names are matched in full: pydantic's pattern engine has no "$ before a final newline".
NodeName = Annotated[str, StringConstraints(pattern=NODE_NAME.pattern)]
ServiceName = Annotated[str, StringConstraints(pattern=SERVICE_NAME.pattern)]
DeviceName = Annotated[str, StringConstraints(pattern=DEVICE_NAME_PATTERN)]
IpAddress = Annotated[str, AfterValidator(_check_ip)]
UnixTime = Annotated[float, Field(ge=0, le=MAX_UNIX_TIME)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Bytes = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Rate = Annotated[float, Field(ge=0, le=MAX_RATE)]
Seconds = Annotated[float, Field(ge=0, le=MAX_RTT_S)]
Port = Annotated[int, Field(ge=1, le=65535)]
# Ids become log lines and file names: printable ASCII without spaces.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN.pattern)]
Text = Annotated[str, StringConstraints(max_length=4096)]


def _out_of_bounds(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -MAX_INT <= value <= MAX_INT
    if isinstance(value, float):
        return not (math.isfinite(value) and abs(value) <= MAX_INT)
    return False


def _check_record(record: MigrationRecord) -> MigrationRecord:
    """A record from another node: every figure finite and within what a float holds exactly."""
    for name, value in _numbers_in(
        record.model_dump(exclude=set(type(record).model_computed_fields))
    ):
        if _out_of_bounds(value):
            raise ValueError(f"record.{name} = {value} is not a finite figure within {MAX_INT}")
    return record


def bounded_record(record: MigrationRecord) -> MigrationRecord:
    """``record`` as the bus carries it: a figure out of bounds (a rate over an instant, a
    division by zero) reads 0, and the rounds go if one of them has such a figure."""
    update: dict[str, Any] = {}
    for name in type(record).model_fields:
        value = getattr(record, name)
        if name == "rounds":
            if any(_out_of_bounds(v) for r in value for _, v in _numbers_in(r.model_dump())):
                update["rounds"] = []
        elif _out_of_bounds(value):
            update[name] = 0.0 if isinstance(value, float) else 0
    return record.model_copy(update=update) if update else record


def _numbers_in(doc: object, where: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _numbers_in(value, f"{where}.{key}" if where else str(key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _numbers_in(value, f"{where}[{i}]")
    elif isinstance(doc, int | float):
        yield where, doc


class _Model(BaseModel):
    # Frozen and strict about unknown fields: a typo on the wire is an error, not a silent
    # default. No NaN/inf: they are not JSON and would poison the policies' arithmetic.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class _Message(_Model):
    version: Literal[1] = 1


# --- node status -------------------------------------------------------------------------


class ServiceInfo(_Model):
    """One service running on a node, as its agent measures it."""

    name: ServiceName
    state_bytes: Bytes
    dirty_rate_bytes_per_s: Rate
    data_ip: IpAddress
    port: Port


class LinkMeasurement(_Model):
    """The last measurement of the data link from this node to ``peer``."""

    peer: NodeName
    rtt_s: Seconds
    throughput_bytes_per_s: Rate
    at: UnixTime


class NodeStatus(_Message):
    """A node's retained status; its last-will is the same with ``online=False``."""

    node: NodeName
    online: bool
    at: UnixTime
    load: Annotated[
        float, Field(ge=0, le=MAX_LOAD, description="1-min load / cores, or the CPU share")
    ]
    mem_total_bytes: Bytes
    mem_free_bytes: Bytes
    services: list[ServiceInfo] = Field(default_factory=list, max_length=MAX_LIST)
    capabilities: NodeCapabilities
    links: list[LinkMeasurement] = Field(default_factory=list, max_length=MAX_LIST)
    draining: bool = False
    migrating: list[ServiceName] = Field(default_factory=list, max_length=MAX_LIST)
    """Services with an outgoing migration under way on this node (not in ``services``)."""


# --- commands ----------------------------------------------------------------------------


def _now() -> float:
    return time.time()


class _Command(_Message):
    """What every command carries: a unique id and when it was sent (the sender's clock)."""

    command_id: Id
    at: UnixTime = Field(default_factory=_now)
    """A receiver refuses a stale command, and one whose id it took already (a replay)."""


class MigrateCommand(_Command):
    kind: Literal["migrate"] = "migrate"
    service: ServiceName
    destination: NodeName
    technique: Technique
    compression: bool = True
    """zstd on the state transfer where it pays, per file and chunk; False forces it off."""
    precopy: PrecopyStopRules = Field(default_factory=PrecopyStopRules)
    reason: Text = ""


class DeployCommand(_Command):
    kind: Literal["deploy"] = "deploy"
    service: ServiceName
    state_mb: Annotated[float, Field(ge=0, le=1 << 20)]
    dirty_kbps: Annotated[float, Field(ge=0, le=MAX_RATE / 1024)]


class UndeployCommand(_Command):
    kind: Literal["undeploy"] = "undeploy"
    service: ServiceName


class DrainCommand(_Command):
    kind: Literal["drain"] = "drain"


Command: TypeAlias = Annotated[
    MigrateCommand | DeployCommand | UndeployCommand | DrainCommand,
    Field(discriminator="kind"),
]

# --- events ------------------------------------------------------------------------------


class CommandAck(_Message):
    """The end-to-end answer to a command (a broker drops a denied publish silently)."""

    kind: Literal["ack"] = "ack"
    node: NodeName  # who answers: must be the node of the events topic
    command_id: Id
    accepted: bool
    reason: Text | None = None
    error_type: Annotated[str, StringConstraints(max_length=128)] | None = None


class MigrationProgress(_Message):
    kind: Literal["progress"] = "progress"
    node: NodeName
    command_id: Id
    migration_id: Id
    service: ServiceName
    phase: Phase
    bytes_done: Bytes
    bytes_total: Bytes
    rate_bytes_per_s: Rate
    at: UnixTime


class MigrationDone(_Message):
    kind: Literal["done"] = "done"
    node: NodeName
    command_id: Id
    migration_id: Id
    service: ServiceName
    outcome: Outcome
    record: Annotated[MigrationRecord, AfterValidator(_check_record)]
    """The whole record; on the wire its JSON, derived totals included (and ignored on input)."""
    error: Text | None = None


Event: TypeAlias = Annotated[
    CommandAck | MigrationProgress | MigrationDone, Field(discriminator="kind")
]

# --- service location, devices, controller -----------------------------------------------


PresenceState = Literal["running", "moving", "holding"]


class ServicePresence(_Message):
    """Where a service runs now (retained; ``present=False`` withdraws it).

    The presences of one service on different nodes are ordered by ``(seq, node)``: a node
    publishes one more than the highest ``seq`` it has seen for the service (a Lamport clock),
    and the greater node name breaks a tie, so every gateway picks the same one. ``state``:
    ``running`` (it runs on ``node``), ``moving`` (``node`` is about to freeze it for
    migration ``migration_id`` to ``to``; it still serves until ``to`` holds), ``holding``
    (``node`` holds its traffic until the arriving copy runs).
    """

    service: ServiceName
    node: NodeName
    data_ip: IpAddress
    port: Port
    present: bool
    at: UnixTime
    seq: Count = 0
    state: PresenceState = "running"
    migration_id: Id | None = None
    to: NodeName | None = None

    @model_validator(mode="after")
    def _state_fits(self) -> Self:
        if not self.present and self.state != "running":
            raise ValueError(f"a presence that is not present cannot be {self.state}")
        if self.state == "moving":
            if self.to is None or self.migration_id is None:
                raise ValueError("a moving presence names its destination and migration")
            if self.to == self.node:
                raise ValueError(f"{self.node} cannot move {self.service} to itself")
        elif self.to is not None:
            raise ValueError(f"only a moving presence names a destination, not a {self.state} one")
        if self.state == "holding" and self.migration_id is None:
            raise ValueError("a holding presence names the migration it holds for")
        return self


class DeviceAttach(_Message):
    """A device attached to a gateway and uses ``service`` there."""

    device: DeviceName
    gateway: NodeName
    at: UnixTime
    service: ServiceName


class Decision(_Message):
    """A controller decision with the reason and the numbers it predicted."""

    service: ServiceName
    source: NodeName
    destination: NodeName
    technique: Technique
    reason: Text
    predicted: dict[str, JsonValue] = Field(default_factory=dict, max_length=64)
    trigger: Literal["mobility", "load", "drain", "manual"]
    at: UnixTime


BusMessage: TypeAlias = (
    NodeStatus
    | MigrateCommand
    | DeployCommand
    | UndeployCommand
    | DrainCommand
    | CommandAck
    | MigrationProgress
    | MigrationDone
    | ServicePresence
    | DeviceAttach
    | Decision
)

# --- codec -------------------------------------------------------------------------------

_ADAPTERS: dict[TopicKind, TypeAdapter[Any]] = {
    TopicKind.STATUS: TypeAdapter(NodeStatus),
    TopicKind.CMD: TypeAdapter(Command),
    TopicKind.EVENTS: TypeAdapter(Event),
    TopicKind.SERVICE: TypeAdapter(ServicePresence),
    TopicKind.ATTACH: TypeAdapter(DeviceAttach),
    TopicKind.DECISIONS: TypeAdapter(Decision),
}

_MODELS: dict[TopicKind, tuple[type[BaseModel], ...]] = {
    TopicKind.STATUS: (NodeStatus,),
    TopicKind.CMD: (MigrateCommand, DeployCommand, UndeployCommand, DrainCommand),
    TopicKind.EVENTS: (CommandAck, MigrationProgress, MigrationDone),
    TopicKind.SERVICE: (ServicePresence,),
    TopicKind.ATTACH: (DeviceAttach,),
    TopicKind.DECISIONS: (Decision,),
}

# Topics whose retained message may be cleared with an empty payload: a node's status (the
# testbed removes a node). Not a service's presence: an empty payload says nothing of who sent
# it or when, so a node withdraws a presence with one of its own, ``present=False``, that
# outranks its earlier ones like any other.
RETAINED_KINDS = frozenset({TopicKind.STATUS})


def _kinds(kind: TopicKind) -> frozenset[str]:
    found = set()
    for model in _MODELS[kind]:
        field = model.model_fields.get("kind")
        if field is not None:
            found.add(str(field.default))
    return frozenset(found)


_KINDS = {kind: _kinds(kind) for kind in TopicKind}


@dataclass(frozen=True, slots=True)
class Cleared:
    """An empty retained payload: whatever was retained on ``topic`` is gone."""

    topic: TopicRef


def _node_names(ref: TopicRef, msg: BusMessage) -> Iterator[tuple[str, str]]:
    """Every (field, node name) the topic and the payload mention."""
    if ref.node is not None:
        yield "topic", ref.node
    match msg:
        case NodeStatus():
            yield "node", msg.node
            for link in msg.links:
                yield "links.peer", link.peer
        case MigrateCommand():
            yield "destination", msg.destination
        case ServicePresence():
            yield "node", msg.node
            if msg.to is not None:
                yield "to", msg.to
        case CommandAck() | MigrationProgress() | MigrationDone():
            yield "node", msg.node
        case DeviceAttach():
            yield "gateway", msg.gateway
        case Decision():
            yield "source", msg.source
            yield "destination", msg.destination
        case _:
            pass


def check_fits(
    topic: str, msg: BusMessage, *, known_nodes: Collection[str] | None = None
) -> TopicRef:
    """Check that ``msg`` belongs on ``topic`` and names only known nodes; return the topic."""
    ref = parse_topic(topic)
    if not isinstance(msg, _MODELS[ref.kind]):
        raise SchemaError(
            Rejection.TOPIC_MISMATCH,
            f"a {type(msg).__name__} does not belong on a {ref.kind} topic",
            topic=topic,
        )
    mismatch: str | None = None
    match msg:
        case NodeStatus() | CommandAck() | MigrationProgress() | MigrationDone():
            if msg.node != ref.node:
                mismatch = f"payload node {msg.node!r} != topic node {ref.node!r}"
        case ServicePresence():
            if msg.node != ref.node or msg.service != ref.service:
                mismatch = (
                    f"payload {msg.service!r}@{msg.node!r} != topic {ref.service!r}@{ref.node!r}"
                )
        case DeviceAttach():
            if msg.device != ref.device:
                mismatch = f"payload device {msg.device!r} != topic device {ref.device!r}"
        case MigrateCommand():
            if msg.destination == ref.node:
                mismatch = f"node {ref.node!r} cannot migrate {msg.service!r} to itself"
        case Decision():
            if msg.source == msg.destination:
                mismatch = f"source and destination are both {msg.source!r}"
        case _:
            pass
    if mismatch is not None:
        raise SchemaError(Rejection.TOPIC_MISMATCH, mismatch, topic=topic)
    if known_nodes is not None:
        for where, name in _node_names(ref, msg):
            if name not in known_nodes:
                raise SchemaError(
                    Rejection.UNKNOWN_NODE,
                    f"unknown node {name!r} ({where}); known: {', '.join(sorted(known_nodes))}",
                    topic=topic,
                )
    return ref


def encode(topic: str, msg: BusMessage, *, known_nodes: Collection[str] | None = None) -> bytes:
    """The JSON bytes of ``msg`` for ``topic``, after the same checks a receiver applies."""
    check_fits(topic, msg, known_nodes=known_nodes)
    data = msg.model_dump_json().encode()
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SchemaError(
            Rejection.OVERSIZE,
            f"{len(data)} bytes > {MAX_PAYLOAD_BYTES}",
            topic=topic,
        )
    return data


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value} does not fit a float")
    return number


def decode(
    topic: str, payload: bytes, *, known_nodes: Collection[str] | None = None
) -> BusMessage | Cleared:
    """Parse and validate the payload received on ``topic``; raise :class:`SchemaError`."""
    # The size check comes first so that a huge payload costs nothing to reject.
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise SchemaError(
            Rejection.OVERSIZE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}", topic=topic
        )
    ref = parse_topic(topic)
    if not payload:
        if ref.kind in RETAINED_KINDS:
            return Cleared(ref)
        why = "empty payload"
        if ref.kind is TopicKind.SERVICE:
            why += "; a node withdraws a presence with present=false, never an empty payload"
        raise SchemaError(Rejection.MALFORMED, why, topic=topic)
    try:
        obj = json.loads(
            payload.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SchemaError(Rejection.MALFORMED, f"not JSON: {exc}", topic=topic) from None
    if not isinstance(obj, dict):
        raise SchemaError(
            Rejection.MALFORMED, f"a JSON object is expected, got {type(obj).__name__}", topic=topic
        )
    version = obj.get("version")
    if type(version) is not int or version != VERSION:
        raise SchemaError(
            Rejection.UNKNOWN_VERSION,
            f"version {version!r}, this node speaks version {VERSION}",
            topic=topic,
        )
    kinds = _KINDS[ref.kind]
    kind = obj.get("kind")
    if kinds and not (isinstance(kind, str) and kind in kinds):
        raise SchemaError(
            Rejection.UNKNOWN_KIND,
            f"kind {kind!r} on a {ref.kind} topic; expected one of {sorted(kinds)}",
            topic=topic,
        )
    try:
        # Strict JSON validation: "5683" is not a port and "true" is not a bool on this bus.
        msg: BusMessage = _ADAPTERS[ref.kind].validate_json(payload, strict=True)
    except ValidationError as exc:
        raise SchemaError(Rejection.INVALID, _summary(exc), topic=topic) from None
    except InvalidConditionsError as exc:
        # The policies' own checks of a value the bounds above let through.
        raise SchemaError(Rejection.INVALID, str(exc), topic=topic) from None
    check_fits(topic, msg, known_nodes=known_nodes)
    return msg


def _summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


# --- acknowledgements ----------------------------------------------------------------------


def accept(node: str, command_id: str) -> CommandAck:
    return CommandAck(node=node, command_id=command_id, accepted=True)


def reject(node: str, command_id: str, error: BaseException | str) -> CommandAck:
    """The typed rejection of a command: the error's class and message, on the wire."""
    reason = str(error) if isinstance(error, BaseException) else error
    error_type = type(error).__name__ if isinstance(error, BaseException) else None
    return CommandAck(
        node=node,
        command_id=command_id,
        accepted=False,
        reason=reason[:4000] or "rejected",
        error_type=error_type,
    )


def command_id_of(payload: bytes) -> str | None:
    """Best effort: the ``command_id`` of a command that failed validation, or None.

    Lets a node answer even an invalid command with a rejection, so the sender learns why at
    once instead of waiting for its timeout.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    value = obj.get("command_id")
    if isinstance(value, str) and ID_PATTERN.fullmatch(value):
        return value
    return None
