"""The migration state machine: phases, legal transitions and the point of no return.

Pure logic, no I/O: the engine asks it where a migration may go next and what a failure means.

The point of no return (``COMMITTED``) is reached when the destination has restored the service
AND holds its complete state:
- cold and pre-copy: when the restore at the destination has returned and the service runs;
- post-copy and hybrid: only when the last lazy page has arrived (the lazy-pages daemon reported
  N/N and exited 0). Until then the source keeps the complete frozen image on its own disk.

Before it, any failure rolls back: the destination copy is killed and its files removed, and the
service is restored (or simply left running) on the source. During post-copy's lazy window the
destination already serves requests; a rollback then resumes the source from the freeze point,
so updates the destination applied in that window are lost: the record says how long the window
was. The destination fences itself (kills its copy) when its page source fails, and the source
restores only after the destination confirmed the abort or after the fencing timeout, so two live
copies never coexist. After the point of no return the destination owns the service; the source
only cleans up, and a cleanup failure never brings the service back to the source.
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
    source_frozen: bool = False  # the service no longer runs on the source

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
        if to is Phase.DUMPING:
            self.source_frozen = True
        self._set(to)

    def fail(self) -> Phase:
        """A failure happened in the current phase: go to ROLLING_BACK or FAILED.

        Returns the new phase; the engine then performs the rollback (before the point of no
        return) or leaves the service with the destination (after it).
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

    def needs_source_restore(self) -> bool:
        """On rollback: must the source restore from its own image (it was frozen/killed)?"""
        return self.source_frozen

    def _set(self, to: Phase) -> None:
        self.phase = to
        self.history.append(to)


def forward_path(technique: Technique) -> tuple[Phase, ...]:
    return _FORWARD[technique]
