"""The record of one migration's fence and its transitions, without any I/O.

A fence is armed with a deadline on CLOCK_MONOTONIC (``time.monotonic()`` is system-wide on
Linux, so the agent and the watchdog process compare the same numbers). It ends either disarmed
(the copy is owned) or fired (the copy is killed, for good). The deadline and the state are
decided here; ``fence_store`` keeps the record in a file and ``fence_watch`` enforces it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fogmig.platform.base.errors import FenceError, FenceFiredError

VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class FenceState(StrEnum):
    """Where a fence stands; ``disarmed`` and ``fired`` are final."""

    ARMED = "armed"
    DISARMED = "disarmed"
    FIRED = "fired"


def check_name(what: str, value: str) -> str:
    """Migration and container ids become file names and runc arguments: keep them plain."""
    if not NAME.fullmatch(value):
        raise FenceError(
            f"invalid {what} {value!r} for a fence: use letters, digits and '._+-', "
            "at most 128 characters, not starting with a dot or a dash"
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class FenceRecord:
    """The content of one fence file."""

    migration_id: str
    """The migration the fence belongs to; also the file's name."""
    node: str
    """The node whose runtime holds the container."""
    container_id: str
    """The runc container the fence kills."""
    runc_root: str
    """runc's ``--root`` for the node."""
    runc: str
    """The runc executable (absolute path, so the watchdog does not depend on PATH)."""
    netns: str | None
    """The node's network namespace name when the watchdog runs outside it, else None."""
    state: FenceState
    """Armed, disarmed or fired."""
    deadline: float
    """When the lease ends, in ``time.monotonic()`` seconds."""
    grace_s: float
    """How long after firing the watchdog keeps killing a container of that id."""
    boot_id: str
    """The kernel's boot id when armed: a monotonic time means nothing after a reboot."""
    armed_at: float
    """When the fence was armed (monotonic seconds)."""
    fired_at: float | None = None
    """When it fired (monotonic seconds)."""
    killed_at: float | None = None
    """When the watchdog finished its first kill after firing (monotonic seconds)."""
    reason: str | None = None
    """Why it fired."""
    watchdog_pid: int | None = None
    """The watchdog process that enforces this record, once it has started."""
    version: int = VERSION
    """The file format."""

    def expired(self, *, now: float, boot_id: str) -> bool:
        """True once the lease is over (or the clock it was measured on has restarted)."""
        return boot_id != self.boot_id or now >= self.deadline

    def due(self, *, now: float, boot_id: str) -> bool:
        """True when an armed fence must fire now."""
        return self.state is FenceState.ARMED and self.expired(now=now, boot_id=boot_id)

    def grace_over(self, *, now: float, boot_id: str) -> bool:
        """True when a fired fence has watched long enough for a late container."""
        if self.state is not FenceState.FIRED:
            return False
        if boot_id != self.boot_id or self.fired_at is None:
            return True
        return now >= self.fired_at + self.grace_s


def new_record(
    *,
    migration_id: str,
    node: str,
    container_id: str,
    runc_root: str,
    runc: str,
    netns: str | None,
    deadline: float,
    grace_s: float,
    now: float,
    boot_id: str,
) -> FenceRecord:
    """A freshly armed fence; refuses a deadline that has already passed."""
    check_name("migration id", migration_id)
    check_name("container id", container_id)
    if grace_s < 0:
        raise FenceError(f"the grace period must not be negative (got {grace_s})")
    if deadline <= now:
        raise FenceFiredError(
            f"fence of {migration_id}: deadline {deadline:.3f} is not after now ({now:.3f})"
        )
    return FenceRecord(
        migration_id=migration_id,
        node=node,
        container_id=container_id,
        runc_root=runc_root,
        runc=runc,
        netns=netns,
        state=FenceState.ARMED,
        deadline=deadline,
        grace_s=grace_s,
        boot_id=boot_id,
        armed_at=now,
    )


def _refuse_unless_armed(rec: FenceRecord, what: str, *, now: float, boot_id: str) -> None:
    if rec.state is FenceState.FIRED:
        raise FenceFiredError(f"cannot {what} the fence of {rec.migration_id}: it fired")
    if rec.state is FenceState.DISARMED:
        raise FenceError(f"cannot {what} the fence of {rec.migration_id}: it is disarmed")
    if rec.expired(now=now, boot_id=boot_id):
        # The watchdog fires within its poll interval; the lease is over already.
        raise FenceFiredError(
            f"cannot {what} the fence of {rec.migration_id}: its deadline has passed"
        )


def extended(rec: FenceRecord, deadline: float, *, now: float, boot_id: str) -> FenceRecord:
    """The record with its deadline pushed to ``deadline``; a lease never shrinks."""
    _refuse_unless_armed(rec, "extend", now=now, boot_id=boot_id)
    if deadline <= rec.deadline:
        return rec
    return dataclasses.replace(rec, deadline=deadline)


def disarmed(rec: FenceRecord, *, now: float, boot_id: str) -> FenceRecord:
    """The record disarmed; idempotent, and refused once fired or past the deadline."""
    if rec.state is FenceState.DISARMED:
        return rec
    _refuse_unless_armed(rec, "disarm", now=now, boot_id=boot_id)
    return dataclasses.replace(rec, state=FenceState.DISARMED)


def fired(rec: FenceRecord, *, now: float, reason: str) -> FenceRecord:
    """The record fired; an already fired record keeps its first firing."""
    if rec.state is FenceState.FIRED:
        return rec
    if rec.state is FenceState.DISARMED:
        raise FenceError(f"cannot fire the fence of {rec.migration_id}: it is disarmed")
    return dataclasses.replace(rec, state=FenceState.FIRED, fired_at=now, reason=reason)


def encode(rec: FenceRecord) -> bytes:
    return (json.dumps(dataclasses.asdict(rec), sort_keys=True) + "\n").encode()


def decode(data: bytes, *, source: str = "fence file") -> FenceRecord:
    """Parse a record; anything malformed is a :class:`FenceError` naming ``source``."""
    try:
        raw: Any = json.loads(data)
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} fence record")
        fields = {f.name for f in dataclasses.fields(FenceRecord)}
        if set(raw) != fields:
            raise ValueError(f"fields {sorted(set(raw) ^ fields)} differ")
        raw["state"] = FenceState(raw["state"])
        rec = FenceRecord(**raw)
        for name in ("deadline", "grace_s", "armed_at"):
            if not isinstance(getattr(rec, name), int | float):
                raise ValueError(f"{name} is not a number")
        check_name("migration id", rec.migration_id)
        check_name("container id", rec.container_id)
    except (ValueError, TypeError, FenceError) as exc:
        raise FenceError(f"{source} is damaged: {exc}") from exc
    return rec
