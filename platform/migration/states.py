"""The phases of one migration as its record shows them: legal paths and the point of no return.

Pure logic, no I/O. The hand-over itself (who may run the service, when the source may resume)
is decided by the protocol cores in ``migration/handover``; the driver (``engine``) follows
them and stamps these phases in the record, so that each technique walks its fixed path and a
record always says where a migration failed.

The point of no return (``COMMITTED``) is the destination's acknowledgement of ``commit``,
which it sends only once it runs the service with its complete state:
- cold and pre-copy: once the restore at the destination has returned;
- post-copy and hybrid: only when the last lazy page has arrived (the lazy-pages daemon reported
  N/N and exited 0). Until then the source keeps the complete frozen image on its own disk.

A failure before it ends in ``ROLLED_BACK`` (the service runs on the source) once the source
has proof that no copy can run at the destination (docs/handover.md); after it, the
destination owns the service and a failure only ends in ``FAILED``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fogmig.platform.base.vocabulary import Phase, Technique

TERMINAL = frozenset({Phase.DONE, Phase.ROLLED_BACK, Phase.FAILED})
BEFORE_COMMIT = frozenset(
    {
        Phase.PENDING,
        Phase.PREPARING,
        Phase.PRECOPY,
        Phase.DUMPING,
        Phase.TRANSFERRING,
        Phase.RESTORING,
        Phase.LAZY_PAGES,
    }
)


def _path(*, precopy: bool, lazy: bool) -> tuple[Phase, ...]:
    """A technique's phases: pre-copy rounds and a lazy phase are what tell them apart."""
    return (
        Phase.PENDING,
        Phase.PREPARING,
        *((Phase.PRECOPY,) if precopy else ()),
        Phase.DUMPING,
        Phase.TRANSFERRING,
        Phase.RESTORING,
        *((Phase.LAZY_PAGES,) if lazy else ()),
        Phase.COMMITTED,
        Phase.CLEANING_UP,
        Phase.DONE,
    )


_FORWARD: dict[Technique, tuple[Phase, ...]] = {
    t: _path(precopy=t.precopy_rounds, lazy=t.lazy) for t in Technique
}


class IllegalTransition(Exception):
    """The engine tried a transition the state machine forbids: a bug, not a FogmigError."""


@dataclass(slots=True)
class MigrationStateMachine:
    """Tracks one migration's phase and decides what a failure means."""

    technique: Technique
    phase: Phase = Phase.PENDING
    history: list[Phase] = field(default_factory=lambda: [Phase.PENDING])

    @property
    def committed(self) -> bool:
        """Whether the point of no return has been passed."""
        return self.phase not in BEFORE_COMMIT and self.phase not in (
            Phase.ROLLING_BACK,
            Phase.ROLLED_BACK,
        )

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def advance(self, to: Phase) -> None:
        """Move forward along the technique's path; skipping is not allowed."""
        path = _FORWARD[self.technique]
        if self.phase not in path or to not in path:
            raise IllegalTransition(f"{self.technique}: {self.phase} -> {to}")
        if path.index(to) != path.index(self.phase) + 1:
            raise IllegalTransition(f"{self.technique}: {self.phase} -> {to} skips a phase")
        self._set(to)

    def fail(self) -> Phase:
        """A failure happened in the current phase: go to ROLLING_BACK or FAILED.

        Returns the new phase: ``ROLLING_BACK`` before the point of no return, ``FAILED`` after
        it or when the rollback itself failed.
        """
        if self.done:
            raise IllegalTransition(f"failure reported after the end ({self.phase})")
        if self.phase is Phase.ROLLING_BACK:
            # The rollback itself failed: nothing safe is left to try automatically.
            self._set(Phase.FAILED)
        elif self.committed:
            self._set(Phase.FAILED)
        else:
            self._set(Phase.ROLLING_BACK)
        return self.phase

    def rolled_back(self) -> None:
        if self.phase is not Phase.ROLLING_BACK:
            raise IllegalTransition(f"rolled back from {self.phase}")
        self._set(Phase.ROLLED_BACK)

    def _set(self, to: Phase) -> None:
        self.phase = to
        self.history.append(to)


def forward_path(technique: Technique) -> tuple[Phase, ...]:
    return _FORWARD[technique]
