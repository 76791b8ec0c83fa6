"""The points of a migration at which the node agents move a service's traffic.

The migration engine calls these on the source and on the destination; the agent implements
them (:class:`fogmig.platform.agent.follow.Follow`) so that what the devices see follows the
service through the freeze, the restore and a rollback. :class:`NoHooks` does nothing.
"""

from __future__ import annotations

from typing import Protocol


class HandoverHooks(Protocol):
    async def freezing(self, service: str, destination: str, migration_id: str) -> None:
        """Source, just before the final freeze."""

    async def running_here(self, service: str, migration_id: str) -> None:
        """Destination, as soon as the restored service runs (before lazy pages finish)."""

    async def resumed_here(self, service: str, migration_id: str) -> None:
        """Source, after a rollback resume."""

    async def gave_up(self, service: str, migration_id: str) -> None:
        """Destination, when it kills/tombstones its copy."""

    async def owned(self, service: str, migration_id: str) -> None:
        """Destination at commit."""


class NoHooks:
    """Hooks that do nothing (a migration without an agent around it, and the tests)."""

    async def freezing(self, service: str, destination: str, migration_id: str) -> None:
        pass

    async def running_here(self, service: str, migration_id: str) -> None:
        pass

    async def resumed_here(self, service: str, migration_id: str) -> None:
        pass

    async def gave_up(self, service: str, migration_id: str) -> None:
        pass

    async def owned(self, service: str, migration_id: str) -> None:
        pass
