"""Typed calls and replies between the source and destination agents of a migration.

One pydantic model per call and per reply; :data:`OPS` maps each operation name to its request
and reply model, and :func:`decode_call` / :func:`decode_reply` turn the channel's untyped dicts
into them, refusing unknown operations and malformed or out-of-range values with a
:class:`MigrationError`. Any call may also be answered with :class:`Refused`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogmig.platform.base.errors import MigrationError
from fogmig.platform.base.vocabulary import Technique

MAX_INT = 2**53  # every integer survives a round trip through any JSON implementation
MAX_SECONDS = 1e6

MigrationId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
NodeName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,9}$")]
ServiceName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")]
DirName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Epoch = Annotated[int, Field(ge=0, le=MAX_INT)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Seconds = Annotated[float, Field(ge=0.0, le=MAX_SECONDS)]
Detail = Annotated[str, Field(max_length=512)]
# The channel hands the calls over as plain JSON values: a technique arrives as its name.
WireTechnique = Annotated[Technique, Field(strict=False)]

DestState = Literal[
    "unknown",  # no record of the migration (answered to status only)
    "prepared",  # files may be arriving; no copy exists
    "restoring",  # a restore runs under the fence
    "running",  # the copy runs under the fence, not yet owner
    "committed",  # the destination owns the service at the new epoch
    "aborted",  # tombstone: aborted on request; never runs
    "fenced",  # tombstone: fence fired, lazy pages failed or restarted; never runs
    "stale",  # tombstone: prepared but the source fell silent; never runs
]
TOMBSTONES: frozenset[str] = frozenset({"aborted", "fenced", "stale"})


class Message(BaseModel):
    """Base of every call and reply: frozen, no extra keys, no NaN or infinity, exact types."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    migration_id: MigrationId


class Ticket(BaseModel):
    """A lease ticket the destination issued; its lease runs from the issue on its own clock.

    ``incarnation`` changes at every restart of the destination agent, so a ticket issued
    before a crash never matches one issued after it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    incarnation: Count
    seq: Count


class Request(Message):
    """A call from one agent to the other; ``op`` names it on the wire."""

    op: ClassVar[str]


class Reply(Message):
    """A positive answer to a call."""

    kind: Literal["ok"] = "ok"


class TicketedRequest(Request):
    """A call that renews the destination's lease with the last ticket the source received."""

    ticket: Ticket | None = None


class TicketedReply(Reply):
    """A reply that hands the source a fresh lease ticket."""

    ticket: Ticket


# --- calls from the source to the destination --------------------------------------------------


class Prepare(Request):
    """Announce a migration: the destination will own ``service`` at ``epoch`` if it commits."""

    op = "prepare"
    service: ServiceName
    epoch: Epoch
    source: NodeName
    technique: WireTechnique
    args: list[Annotated[str, Field(max_length=4096)]] = Field(max_length=64)


class PrepareOk(TicketedReply):
    node: NodeName


class SendFiles(TicketedRequest):
    """Metadata of a directory the source streamed (the bytes travel out of band)."""

    op = "send_files"
    name: DirName
    files: Count
    bytes: Count


class SendFilesOk(TicketedReply):
    pass


class ApplyDelta(TicketedRequest):
    """Rebuild image directory ``out`` from ``base`` and the page delta ``delta``."""

    op = "apply_delta"
    base: DirName
    delta: DirName
    out: DirName
    link: bool = False
    """Write ``out`` as a child of ``base`` (CRIU's ``parent`` link, the unchanged pages left
    there) rather than rebuild it whole: pre-copy's final image, restored at once."""


class ApplyDeltaOk(TicketedReply):
    seconds: Seconds = 0.0


class Restore(TicketedRequest):
    """Restore the service from ``images`` under the fence (``lazy``: pages fault in later;
    with ``base``, a copy already here, only the pages ``changed`` lists come from the source).

    ``prelude`` is the final data call (the files or the delta of the frozen service), done
    first in the same exchange: the frozen window then holds one round trip, not two.
    """

    op = "restore"
    epoch: Epoch
    mode: Literal["full", "lazy"]
    images: DirName
    base: DirName | None = None
    changed: DirName | None = None
    fill: bool = False
    """With ``base``: restore the pages the base holds (those ``changed`` does not list) at
    once, from the base, rather than serve them lazily (post-copy's small live copy)."""
    prelude: SendFiles | ApplyDelta | None = None


class RestoreOk(TicketedReply):
    seconds: Seconds = 0.0
    """The restore's own time at the destination."""
    prelude_seconds: Seconds = 0.0
    """The prelude's time at the destination (checking the files, applying the delta)."""
    pid: Annotated[int, Field(ge=1, le=2**22)] | None = None


class LazyStatus(TicketedRequest):
    """Ask how the lazy page transfer goes; doubles as the keep-alive of the lazy window."""

    op = "lazy_status"


class LazyStatusOk(TicketedReply):
    done: bool
    remote_bytes: Count = 0
    remote_pages: Count = 0
    local_pages: Count = 0
    seconds: Seconds = 0.0
    wire_bytes: Count = 0
    """What the remote pages cost on the link, compressed where that paid (0: not counted)."""


class Commit(TicketedRequest):
    """Hand the service over: the destination persists "owner at ``epoch``", then answers."""

    op = "commit"
    epoch: Epoch


class CommitOk(Reply):
    epoch: Epoch
    owner: NodeName


class Abort(Request):
    """Drop the migration; the answer is the destination's durable outcome for it."""

    op = "abort"
    epoch: Epoch
    reason: Detail = ""


class AbortOk(Reply):
    """``aborted``/``fenced``/``stale``: the copy can never run; ``committed``: it owns it."""

    outcome: Literal["aborted", "fenced", "stale", "committed"]
    epoch: Epoch | None = None


class Status(Request):
    """Read the destination's journal state of the migration; changes nothing."""

    op = "status"


class StatusOk(Reply):
    state: DestState
    epoch: Epoch | None = None
    detail: Detail = ""


# --- calls from the destination to the source --------------------------------------------------


MAX_PAGE_RUNS = 32
"""Runs one page call may ask for: scattered small runs cost one round trip, not one each."""


class PageRun(BaseModel):
    """``nr_pages`` contiguous pages from ``vaddr``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    vaddr: Annotated[int, Field(ge=0, le=2**64 - 1)]
    nr_pages: Annotated[int, Field(ge=1, le=256)]


class GetPages(Request):
    """Read ``nr_pages`` pages of process ``pid`` at ``vaddr`` from the source's image, and
    then each of the ``more`` runs (at most 256 pages in all)."""

    op = "get_pages"
    pid: Annotated[int, Field(ge=1, le=2**22)]
    vaddr: Annotated[int, Field(ge=0, le=2**64 - 1)]
    nr_pages: Annotated[int, Field(ge=1, le=256)]
    more: Annotated[list[PageRun], Field(max_length=MAX_PAGE_RUNS - 1)] = []


class GetPagesOk(Reply):
    """The pages follow as the call's binary data; ``tagged``: as one payload of the
    transfer channel's chunk codec (zstd where that pays, the bytes as they are otherwise).
    ``runs``: with ``more`` runs asked for, the pages found for each run in order (a prefix of
    each), whose bytes follow one another."""

    nr_pages: Annotated[int, Field(ge=0, le=256)]
    tagged: bool = False
    runs: Annotated[list[Annotated[int, Field(ge=0, le=256)]], Field(max_length=MAX_PAGE_RUNS)] = []


class Refused(Message):
    """A call the receiver will not perform; ``state`` says why.

    A refusal in :data:`TOMBSTONES` is sent only once that state is durable, so it proves the
    copy can never run; ``committed`` proves the destination owns the service.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    kind: Literal["refused"] = "refused"
    state: Literal[
        "unknown", "aborted", "fenced", "stale", "committed", "lease_expired", "busy", "invalid"
    ]
    detail: Detail = ""


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: the model of its call and of its positive reply."""

    request: type[Request]
    reply: type[Reply]


OPS: dict[str, Op] = {
    op.request.op: op
    for op in (
        Op(Prepare, PrepareOk),
        Op(SendFiles, SendFilesOk),
        Op(ApplyDelta, ApplyDeltaOk),
        Op(Restore, RestoreOk),
        Op(LazyStatus, LazyStatusOk),
        Op(Commit, CommitOk),
        Op(Abort, AbortOk),
        Op(Status, StatusOk),
        Op(GetPages, GetPagesOk),
    )
}
"""The single dispatch registry: operation name -> (request model, reply model)."""


def _mid(params: object) -> str:
    if isinstance(params, dict):
        value = params.get("migration_id")
        if isinstance(value, str) and len(value) <= 128 and value.isprintable():
            return value
    return "-"


def _invalid(op: str, params: object, exc: ValidationError | str) -> MigrationError:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        exc = f"{where}: {first['msg']} ({exc.error_count()} error(s))"
    return MigrationError(
        f"malformed {op!r} message: {exc}",
        phase=f"protocol:{op}"[:80] if op.isprintable() else "protocol",
        migration_id=_mid(params),
        hint="both agents must run the same fogmig version",
    )


def _op(op: str, params: object) -> Op:
    found = OPS.get(op) if isinstance(op, str) else None
    if found is None:
        raise MigrationError(
            f"unknown operation {op!r}",
            phase="protocol",
            migration_id=_mid(params),
            hint="both agents must run the same fogmig version",
        )
    return found


def decode_call(op: str, params: dict[str, Any]) -> Request:
    """The typed call for ``op`` with ``params``; unknown or malformed: MigrationError."""
    model = _op(op, params).request
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise _invalid(op, params, exc) from None


def encode_call(request: Request) -> tuple[str, dict[str, Any]]:
    """(operation name, JSON-able params) of a typed call."""
    _op(request.op, None)
    return request.op, request.model_dump(mode="json")


def decode_reply(op: str, result: dict[str, Any]) -> Reply | Refused:
    """The typed reply to a call of ``op``: its positive reply model, or :class:`Refused`."""
    model: type[Reply] | type[Refused] = _op(op, result).reply
    if isinstance(result, dict) and result.get("kind") == "refused":
        model = Refused
    try:
        return model.model_validate(result)
    except ValidationError as exc:
        raise _invalid(op, result, exc) from None


def encode_reply(op: str, reply: Reply | Refused) -> dict[str, Any]:
    """The JSON-able result of a reply, checked against the operation's reply model."""
    expected = _op(op, None).reply
    if not isinstance(reply, expected | Refused):
        raise _invalid(op, None, f"a {type(reply).__name__} does not answer {op!r}")
    return reply.model_dump(mode="json")
