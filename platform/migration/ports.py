"""The two ports a migration drives: the source node's own runtime, and the destination peer.

The techniques (cold.py, precopy.py, postcopy.py, hybrid.py) only talk to these interfaces, so
their phase logic and metrics can be tested with scripted fakes; the agent plugs in the real
runc/CRIU runtime and the authenticated transfer channel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class DumpResult:
    """A checkpoint on the source: where the images are and what it cost."""

    image_dir: Path
    duration_s: float
    freeze_s: float
    image_bytes: int


@dataclass(frozen=True, slots=True)
class SentResult:
    bytes_sent: int
    seconds: float


class SourcePort(Protocol):
    """The source node's side: checkpoint the service, bring it back, clean up."""

    async def checkpoint(self, image_dir: Path, *, leave_running: bool) -> DumpResult: ...

    async def restore_here(self, image_dir: Path) -> float:
        """Roll back: restore the service on the source from its own complete image."""
        ...

    async def is_running(self) -> bool: ...

    async def forget(self) -> None:
        """After the point of no return: delete the stopped container and its bundle."""
        ...

    def serve_pages(self, migration_id: str, image_dir: Path) -> None:
        """Offer the complete image's pages to the destination's lazy page server."""
        ...

    def stop_serving_pages(self, migration_id: str) -> None: ...


class PeerPort(Protocol):
    """The destination agent, reached over the data link."""

    async def call(
        self, op: str, params: Mapping[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]: ...

    async def send_dir(
        self, migration_id: str, local_dir: Path, subdir: str, progress: ProgressFn | None = None
    ) -> SentResult: ...
