"""The domain's shared words: migration techniques, phases and outcomes, page size, capabilities.

Defined once here and used by the policies, the migration engine, the bus schemas, the agent,
the controller, the applications and the command line, so that a technique or an outcome is the
same value everywhere (the enums are ``StrEnum``: on the wire and on disk they are their names).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

PAGE_SIZE = 4096
"""Bytes per memory page, as CRIU's images and the kernel's pagemaps count them (x86-64, arm64
with 4 KiB pages). The containerised sensor keeps its own copy: it imports nothing of fogmig."""


class Technique(StrEnum):
    """The four stateful migration techniques of the paper (section 4, Table 1)."""

    COLD = "cold"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    HYBRID = "hybrid"

    @property
    def lazy(self) -> bool:
        """Post-copy and hybrid restore with userfaultfd and fetch pages on demand."""
        return self in (Technique.POSTCOPY, Technique.HYBRID)

    @property
    def precopy_rounds(self) -> bool:
        """Pre-copy and hybrid ship memory in leave-running rounds before the final dump."""
        return self in (Technique.PRECOPY, Technique.HYBRID)


class Phase(StrEnum):
    """Where one migration is in the state machine (``fogmig.platform.migration.states``)."""

    PENDING = "pending"
    PREPARING = "preparing"  # destination told, directory and bundle ready
    PRECOPY = "precopy"  # leave-running rounds (pre-copy, hybrid)
    DUMPING = "dumping"  # service frozen and dumped on the source (downtime starts)
    TRANSFERRING = "transferring"  # the dump crosses the link
    RESTORING = "restoring"  # restore at the destination
    LAZY_PAGES = "lazy_pages"  # destination runs; pages still arriving (post-copy, hybrid)
    COMMITTED = "committed"  # point of no return passed: destination owns the service
    CLEANING_UP = "cleaning_up"
    DONE = "done"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # failed after the point of no return, or the rollback failed


class Outcome(StrEnum):
    """How a migration ended (or that it has not yet).

    Not to be confused with ``fogmig.device_sim.events.RequestOutcome``, the fate of one device
    request.
    """

    COMPLETED = "completed"
    """The destination owns the service, the source is clean."""
    ROLLED_BACK = "rolled_back"
    """Failed before the point of no return: the service runs on the source again."""
    FAILED_AFTER_COMMIT = "failed_after_commit"
    """Failed and not put back on the source: after the point of no return, or the rollback
    itself failed. The record's ``error`` says what an operator has to look at."""
    RUNNING = "running"

    @property
    def terminal(self) -> bool:
        return self is not Outcome.RUNNING


TerminalOutcome = Literal[Outcome.COMPLETED, Outcome.ROLLED_BACK, Outcome.FAILED_AFTER_COMMIT]
"""How a migration that has ended ended (as a field type, it also accepts the plain names)."""

CriuVersion = Annotated[str, Field(max_length=64)]


@dataclass(frozen=True, slots=True)
class NodeCapabilities:
    """What a node's CRIU can do: which techniques may use it as source or destination.

    ``postcopy``: lazy restore with userfaultfd works. ``native_predump``: CRIU's own pre-dump
    (soft-dirty tracking) works; without it pre-copy rounds are full leave-running checkpoints
    whose changed pages are found by comparing images. ``criu_version`` is informational.
    The policies read it as an input and the bus carries it in a node's status.
    """

    # A typo on the wire is an error, not a silent default (the bus schemas validate it).
    __pydantic_config__ = ConfigDict(extra="forbid")

    postcopy: bool
    native_predump: bool
    criu_version: CriuVersion | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"postcopy": self.postcopy, "native_predump": self.native_predump}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeCapabilities:
        return cls(postcopy=bool(data["postcopy"]), native_predump=bool(data["native_predump"]))
