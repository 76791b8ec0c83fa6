"""Which commands a node takes: fresh ones, each id once (no I/O).

A command carries the sender's time (``at``). A node takes it only if that time is within
``max_age_s`` before its own clock and at most ``max_skew_s`` after it, and only if no command
with the same id was taken within that window: a replayed command (a captured message sent
again, a redelivery after a broker restart) is refused instead of run twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fogmig.platform.base.errors import FogmigError

MAX_AGE_S = 120.0
"""A command older than this is stale: its sender has long given up waiting."""
MAX_SKEW_S = 30.0
"""How far ahead of this node's clock a sender's clock may be."""
MAX_REMEMBERED = 65_536
"""Ids kept at most; within the window this is more commands than a node ever takes."""


class CommandRefusedError(FogmigError):
    """A command that is stale, from the future, or a replay of one already taken."""


class CommandReplayedError(CommandRefusedError):
    """A command whose id this node took before: a sender that restarted and asks again
    learns from this refusal that its command was taken."""


@dataclass(slots=True, kw_only=True)
class Admission:
    """The ids of the commands a node took in the last ``max_age_s + max_skew_s``."""

    max_age_s: float = MAX_AGE_S
    max_skew_s: float = MAX_SKEW_S
    max_remembered: int = MAX_REMEMBERED
    on_taken: Callable[[], None] | None = None
    """Called once an id is taken, before the command runs (to save the ids taken)."""
    _taken: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """command id -> its ``at``, oldest taken first."""

    def admit(self, command_id: str, at: float, now: float) -> None:
        """Take the command or raise :class:`CommandRefusedError` saying why."""
        self._forget(now)
        if at < now - self.max_age_s:
            raise CommandRefusedError(
                f"command {command_id} is stale: sent {now - at:.0f} s ago "
                f"(at most {self.max_age_s:g} s)",
                hint="are the sender's and this node's clocks synchronised?",
            )
        if at > now + self.max_skew_s:
            raise CommandRefusedError(
                f"command {command_id} is dated {at - now:.0f} s in this node's future "
                f"(at most {self.max_skew_s:g} s)",
                hint="are the sender's and this node's clocks synchronised?",
            )
        if command_id in self._taken:
            raise CommandReplayedError(f"command {command_id} was already taken: a replay")
        self._taken[command_id] = at
        while len(self._taken) > self.max_remembered:
            self._taken.popitem(last=False)
        if self.on_taken is not None:
            self.on_taken()

    def taken(self) -> dict[str, float]:
        """The ids taken within the window and their ``at`` (to save across a restart)."""
        return dict(self._taken)

    def restore(self, taken: dict[str, float], now: float) -> None:
        """Ids saved before a restart: they stay refused as replays within the window."""
        for command_id, at in sorted(taken.items(), key=lambda item: item[1]):
            self._taken.setdefault(command_id, at)
        self._forget(now)

    def _forget(self, now: float) -> None:
        horizon = now - self.max_age_s - self.max_skew_s
        while self._taken:
            oldest = next(iter(self._taken))
            if self._taken[oldest] >= horizon:
                break
            del self._taken[oldest]
