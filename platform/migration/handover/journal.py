"""The agent's append-only migration journal: typed entries, one fsynced JSON line each.

An agent writes an entry BEFORE every irreversible step (freeze, restore, commit, resume,
deletion), so that after a stop or a crash :mod:`recovery` can tell from the journal what may
have happened. A torn last line (the crash hit the write) is ignored and cut off; damage
anywhere else is a :class:`JournalError`. Compaction (:mod:`compaction`) rewrites the file
atomically without the old closed migrations, leaving a :class:`Floor` of their epochs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterable, Set
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.vocabulary import TerminalOutcome
from fogmig.platform.migration.handover.messages import (
    Count,
    Detail,
    Epoch,
    MigrationId,
    NodeName,
    ServiceName,
    WireTechnique,
)

if TYPE_CHECKING:
    from fogmig.platform.migration.handover.compaction import Compacted


class JournalError(FogmigError):
    """The journal cannot be read or written."""

    hint = "the journal is in the node's state directory; keep it, it says what to recover"


class Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class MigrationEntry(Entry):
    migration_id: MigrationId


# --- source side -------------------------------------------------------------------------------


class Begin(MigrationEntry):
    """An accepted migration of ``service``, owned here at ``epoch``."""

    kind: Literal["begin"] = "begin"
    service: ServiceName
    epoch: Epoch
    destination: NodeName
    technique: WireTechnique
    command_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    """The command that asked for it: the terminal event names it."""


class Freezing(MigrationEntry):
    """The service is about to be frozen and dumped (its copy here stops)."""

    kind: Literal["freezing"] = "freezing"


class RestoreSent(MigrationEntry):
    """``restore`` is about to be sent: a copy may run at the destination from now on."""

    kind: Literal["restore_sent"] = "restore_sent"


class CommitSent(MigrationEntry):
    """``commit`` is about to be sent: the fence no longer proves anything."""

    kind: Literal["commit_sent"] = "commit_sent"


class HandedOver(MigrationEntry):
    """The destination owns the service at ``epoch``; the copy here is about to be deleted."""

    kind: Literal["handed_over"] = "handed_over"
    epoch: Epoch


class Resuming(MigrationEntry):
    """The copy here is about to resume as the owner at ``epoch``; ``reason`` is the proof."""

    kind: Literal["resuming"] = "resuming"
    epoch: Epoch
    reason: Detail


class Finished(MigrationEntry):
    """The one terminal outcome of the migration."""

    kind: Literal["finished"] = "finished"
    outcome: TerminalOutcome
    reason: Detail = ""


class Published(MigrationEntry):
    """The terminal event left the agent."""

    kind: Literal["published"] = "published"


# --- destination side --------------------------------------------------------------------------


class Boot(Entry):
    """The agent started; its lease tickets carry ``incarnation``."""

    kind: Literal["boot"] = "boot"
    incarnation: Count


class Prepared(MigrationEntry):
    """A migration of ``service`` from ``source`` that would own it at ``epoch``."""

    kind: Literal["prepared"] = "prepared"
    service: ServiceName
    epoch: Epoch
    source: NodeName
    technique: WireTechnique


class Restoring(MigrationEntry):
    """A restore is about to start under the fence."""

    kind: Literal["restoring"] = "restoring"


class Committed(MigrationEntry):
    """This node owns ``service`` at ``epoch``: written before ``commit`` is answered."""

    kind: Literal["committed"] = "committed"
    service: ServiceName
    epoch: Epoch


class Tombstoned(MigrationEntry):
    """The migration is dead here: its copy never runs again (written before saying so)."""

    kind: Literal["tombstoned"] = "tombstoned"
    reason: Literal["aborted", "fenced", "stale"]
    detail: Detail = ""


# --- both sides ---------------------------------------------------------------------------------

MAX_FLOOR_SERVICES = 65_536
"""A floor names each service this node ever migrated once: far more than a node runs."""


class Floor(Entry):
    """What compaction left of the migrations it dropped: per service, the newest epoch they
    named (see :func:`named_epochs`). No prepare at or below it is accepted here again."""

    kind: Literal["floor"] = "floor"
    epochs: Annotated[dict[ServiceName, Epoch], Field(max_length=MAX_FLOOR_SERVICES)]


SourceEntry = Begin | Freezing | RestoreSent | CommitSent | HandedOver | Resuming | Finished
DestinationEntry = Prepared | Restoring | Committed | Tombstoned
AnyEntry = Annotated[
    Begin
    | Freezing
    | RestoreSent
    | CommitSent
    | HandedOver
    | Resuming
    | Finished
    | Published
    | Boot
    | Prepared
    | Restoring
    | Committed
    | Tombstoned
    | Floor,
    Field(discriminator="kind"),
]
_ENTRY: TypeAdapter[AnyEntry] = TypeAdapter(AnyEntry)


def parse_entry(line: str | bytes) -> AnyEntry:
    return _ENTRY.validate_json(line)


def by_migration(entries: Iterable[AnyEntry]) -> dict[str, list[MigrationEntry]]:
    """The entries of each migration, in journal order."""
    out: dict[str, list[MigrationEntry]] = {}
    for entry in entries:
        if isinstance(entry, MigrationEntry):
            out.setdefault(entry.migration_id, []).append(entry)
    return out


def incarnation(entries: Iterable[AnyEntry]) -> int:
    """The incarnation of the next start: one more than the last ``Boot``."""
    return 1 + max((e.incarnation for e in entries if isinstance(e, Boot)), default=0)


def named_epochs(entries: Iterable[AnyEntry]) -> dict[str, int]:
    """Per service, the newest epoch the entries name: owned, handed over, committed, prepared
    here, or proposed by a ``Begin`` (its epoch + 1), and any :class:`Floor`.

    A proposal counts, so a node's next proposal for a service is above every one it made
    before, even one rolled back: a destination that forgot an attempt (its floor holds the
    attempt's epoch) refuses a replay of it and never the next attempt.
    """
    begun: dict[str, str] = {}
    out: dict[str, int] = {}

    def seen(service: str | None, epoch: int) -> None:
        if service is not None and epoch > out.get(service, -1):
            out[service] = epoch

    for entry in entries:
        if isinstance(entry, Begin):
            begun[entry.migration_id] = entry.service
            seen(entry.service, entry.epoch + 1)
        elif isinstance(entry, HandedOver | Resuming):
            seen(begun.get(entry.migration_id), entry.epoch)
        elif isinstance(entry, Prepared | Committed):
            seen(entry.service, entry.epoch)
        elif isinstance(entry, Floor):
            for service, epoch in entry.epochs.items():
                seen(service, epoch)
    return out


class Journal:
    """One agent's journal file; every :meth:`append` is on disk when it returns."""

    def __init__(self, *, path: Path) -> None:
        self.path = path
        """The JSON-lines file (created with its directory on first use)."""
        self._fd: int | None = None

    def read(self) -> list[AnyEntry]:
        """Every entry; a torn last line is cut off the file so appends start clean."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise JournalError(f"cannot read journal {self.path}: {exc}") from exc
        *whole, tail = data.split(b"\n")
        entries: list[AnyEntry] = []
        for number, line in enumerate(whole, start=1):
            try:
                entries.append(parse_entry(line))
            except ValidationError as exc:
                raise JournalError(f"journal {self.path}: line {number} is damaged") from exc
        if tail:
            # Only the line a crash interrupted may be incomplete: the last, unterminated one.
            try:
                entries.append(parse_entry(tail))
                self._fix_tail(b"\n", keep=len(data))
            except ValidationError:
                self._fix_tail(b"", keep=len(data) - len(tail))
        return entries

    def _fix_tail(self, suffix: bytes, *, keep: int) -> None:
        try:
            with self.path.open("r+b") as fh:
                fh.truncate(keep)
                fh.seek(keep)
                fh.write(suffix)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise JournalError(f"cannot repair journal {self.path}: {exc}") from exc

    def append(self, entry: AnyEntry) -> None:
        """Write ``entry`` as one line and fsync it before returning."""
        line = entry.model_dump_json().encode() + b"\n"
        try:
            if self._fd is None:
                created = not self.path.exists()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                if created:
                    _fsync_dir(self.path.parent)
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
        except OSError as exc:
            raise JournalError(f"cannot append to journal {self.path}: {exc}") from exc

    def rewrite(self, entries: Iterable[AnyEntry]) -> None:
        """Replace the file by ``entries`` atomically: a crash at any point leaves either the
        old file or the new one, each whole (a temporary file in the same directory, fsynced,
        renamed over the journal, then the directory fsynced)."""
        temp = self.path.with_name(self.path.name + ".compact")
        data = "".join(e.model_dump_json() + "\n" for e in entries).encode()
        # Appends after this go to the new file, never to the old one renamed away.
        self.close()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise JournalError(f"cannot rewrite journal {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SharedJournal:
    """One agent's journal as its asyncio parts share it: appends in order, off the loop.

    It reads the file once when made (:meth:`Journal.read` repairs a torn tail, so it must not
    run while appends are under way) and keeps every entry in :attr:`entries`, as bounded as
    the file by :meth:`compact`.
    """

    def __init__(self, *, journal: Journal) -> None:
        self.journal = journal
        """The file."""
        self.entries: list[AnyEntry] = journal.read()
        """Every entry, the file's and those appended since (the kept ones once compacted)."""
        self._lock = asyncio.Lock()

    async def append(self, entry: AnyEntry) -> None:
        """Append ``entry``; it is on disk when this returns (a JournalError otherwise)."""
        async with self._lock:
            await asyncio.to_thread(self.journal.append, entry)
            self.entries.append(entry)

    def epoch_of(self, service: str) -> int:
        """The newest epoch this node's journal names for ``service`` (0: none), a dropped
        migration's included (its :class:`Floor`)."""
        return max(0, named_epochs(self.entries).get(service, 0))

    async def compact(self, *, keep_closed: int, pinned: Set[str] = frozenset()) -> Compacted:
        """Drop all but the newest ``keep_closed`` closed migrations (none of ``pinned``, whose
        work is still under way) from the file and from :attr:`entries`; see
        :func:`~fogmig.platform.migration.handover.compaction.compact`."""
        # The pure rule lives beside the entries it reads, which it imports from here.
        from fogmig.platform.migration.handover.compaction import compact

        async with self._lock:
            done = compact(self.entries, keep_closed=keep_closed, pinned=pinned)
            if done.entries != self.entries:
                await asyncio.to_thread(self.journal.rewrite, done.entries)
                self.entries = list(done.entries)
            return done

    def close(self) -> None:
        self.journal.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dump_lines(entries: Iterable[AnyEntry]) -> str:
    """Entries as journal text (for tests and for an operator's `fogmig` inspection)."""
    return "".join(json.dumps(e.model_dump(mode="json")) + "\n" for e in entries)
