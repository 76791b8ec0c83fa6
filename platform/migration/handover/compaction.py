"""Bounding the migration journal: which closed migrations may be dropped, and what remains.

:func:`compact` is pure: it keeps every migration still open, the newest ``keep_closed``
closed ones, the last ``Boot``, and one :class:`~journal.Floor` holding the newest epoch each
dropped migration named per service. docs/handover.md says why dropping the rest is safe.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

from fogmig.platform.migration.handover.journal import (
    MAX_FLOOR_SERVICES,
    AnyEntry,
    Begin,
    Boot,
    Committed,
    Finished,
    Floor,
    JournalError,
    MigrationEntry,
    Prepared,
    Published,
    Tombstoned,
    named_epochs,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Compacted:
    """The outcome of :func:`compact`."""

    entries: list[AnyEntry]
    """The journal that remains."""
    dropped: frozenset[str]
    """The migrations no longer in it."""
    floor: dict[str, int]
    """Per service, the newest epoch any dropped migration named (earlier floors merged)."""


def closed_migrations(entries: Sequence[AnyEntry]) -> list[str]:
    """The closed migrations, oldest first by their last entry.

    Source side: finished and its terminal event published (recovery: nothing to do).
    Destination side: committed or tombstoned, both final (recovery: at most keep a copy that
    runs, or kill and delete what the agent killed and deleted while it ran). A migration
    with both sides here (one node as its source and destination) must be closed on both.
    """
    kinds: dict[str, set[type]] = {}
    last: dict[str, int] = {}
    for at, entry in enumerate(entries):
        if isinstance(entry, MigrationEntry):
            kinds.setdefault(entry.migration_id, set()).add(type(entry))
            last[entry.migration_id] = at
    closed = []
    for mid, seen in kinds.items():
        source = Begin in seen
        destination = bool(seen & {Prepared, Committed, Tombstoned})
        if not (source or destination):
            continue
        if source and not {Finished, Published} <= seen:
            continue
        if destination and not seen & {Committed, Tombstoned}:
            continue
        closed.append(mid)
    return sorted(closed, key=last.__getitem__)


def compact(
    entries: Sequence[AnyEntry], *, keep_closed: int, pinned: Set[str] = frozenset()
) -> Compacted:
    """Drop every closed migration but the newest ``keep_closed`` and those ``pinned``.

    Only a prefix of a service's incoming migrations goes (oldest first): recovery lets the
    latest of them alone touch the service's container, so a migration stays while an older
    one of the same service must stay. Old ``Boot`` entries go (the last one carries the
    incarnation) and earlier floors merge into the new one, placed first.
    """
    if keep_closed < 0:
        raise ValueError("keep_closed must not be negative")
    closed = closed_migrations(entries)
    candidates = {mid for mid in closed[: max(0, len(closed) - keep_closed)] if mid not in pinned}
    incoming: dict[str, list[str]] = {}
    for entry in entries:
        if isinstance(entry, Prepared):
            incoming.setdefault(entry.service, []).append(entry.migration_id)
    for mids in incoming.values():
        keep_rest = False
        for mid in mids:
            keep_rest = keep_rest or mid not in candidates
            if keep_rest:
                candidates.discard(mid)
    dropped = frozenset(candidates)
    gone = [e for e in entries if isinstance(e, MigrationEntry) and e.migration_id in dropped]
    floors = [e for e in entries if isinstance(e, Floor)]
    floor = named_epochs([*floors, *gone])
    if len(floor) > MAX_FLOOR_SERVICES:
        raise JournalError(f"the journal's floor would name {len(floor)} services")
    boots = [e for e in entries if isinstance(e, Boot)]
    last_boot = max(boots, key=lambda b: b.incarnation, default=None)
    kept: list[AnyEntry] = [Floor(epochs=floor)] if floor else []
    for entry in entries:
        if isinstance(entry, Floor) or (isinstance(entry, Boot) and entry is not last_boot):
            continue
        if isinstance(entry, MigrationEntry) and entry.migration_id in dropped:
            continue
        kept.append(entry)
    return Compacted(entries=kept, dropped=dropped, floor=floor)
