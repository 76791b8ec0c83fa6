"""The controller's state file: read at start, written at every change that matters.

:class:`ControllerStore` reads and writes :class:`SavedController` atomically; a file that is
corrupt, of another format or of another site is set aside with an error and the controller
starts empty. :class:`SaveSchedule` (no I/O) says when to write: at once when a move, its
answer or a drain changed, at most every ``debounce_s`` when only attachments did.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fogmig.platform.base.durable import read_saved, set_aside, write_atomic
from fogmig.platform.base.errors import StateFileError
from fogmig.platform.controller.saved import SavedController

if TYPE_CHECKING:
    from fogmig.platform.controller.core import ControllerCore

_HINT = (
    "the controller starts as if new: it forgets the migrations it had sent and the devices "
    "it followed until they report again; remove the set-aside file once looked at"
)


def durable_key(core: ControllerCore) -> Hashable:
    """What must be saved at once when it changes: queued and running moves, their answers,
    drains, completed moves and ended migrations."""
    ended = core.ended_ids()
    return (
        tuple((s, f.command.command_id, f.acked) for s, f in sorted(core.inflight.items())),
        tuple(
            (s, m.target, m.trigger, m.attempts, m.not_before)
            for s, m in sorted(core.pending.items())
        ),
        tuple(sorted(core.draining.items())),
        ended[-1] if ended else None,
    )


@dataclass(slots=True, kw_only=True)
class SaveSchedule:
    """When the controller writes its state (no I/O; times on its monotonic clock)."""

    debounce_s: float
    _key: Hashable = None
    _revision: int = -1
    _due: float | None = None

    @property
    def due(self) -> float | None:
        """When a debounced write is due (``None``: none waits)."""
        return self._due

    def decide(self, key: Hashable, revision: int, now: float) -> Literal["now", "later", "no"]:
        """``now`` to write at once, ``later`` when :attr:`due` comes, ``no``: nothing new."""
        if key != self._key:
            return "now"
        if revision != self._revision:
            if self._due is None:
                self._due = now + self.debounce_s
            return "now" if now >= self._due else "later"
        return "no"

    def written(self, key: Hashable, revision: int) -> None:
        self._key, self._revision, self._due = key, revision, None


@dataclass(slots=True, kw_only=True)
class ControllerStore:
    """The controller's state file at ``path``, for ``site``."""

    path: Path
    site: str | None
    writes: int = field(default=0)
    """Files written since start."""

    def load(self) -> tuple[SavedController | None, StateFileError | None]:
        saved, error = read_saved(
            self.path,
            SavedController.model_validate_json,
            what="the controller's saved state",
            hint=_HINT,
        )
        if saved is not None and saved.site != self.site:
            kept = set_aside(self.path)
            return None, StateFileError(
                f"{self.path} was saved for site {saved.site!r}, not for {self.site!r} "
                f"(a testbed brought up again is a new site); kept as {kept}; "
                "starting without it",
                kept=kept,
                hint=_HINT,
            )
        return saved, error

    def save(self, saved: SavedController) -> None:
        write_atomic(self.path, saved.model_dump_json().encode())
        self.writes += 1
