"""The two ports an outgoing migration drives: the source node's runtime, and the destination.

The techniques (cold.py, precopy.py, postcopy.py, hybrid.py) and the driver (engine.py) only
talk to these interfaces, so the phase logic, the hand-over and the metrics can be tested with
scripted fakes; the agent plugs in the real runc/CRIU runtime and the authenticated transfer
channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from fogmig.platform.migration.handover.messages import Refused, Reply, Request

ProgressFn = Callable[[int, int], None]

CopyState = Literal["running", "paused", "absent"]
"""What the runtime holds of the service's copy on this node (``absent``: not running, and
no paused process either)."""


@dataclass(frozen=True, slots=True)
class DumpResult:
    """A checkpoint on the source: where the images are and what it cost."""

    image_dir: Path
    duration_s: float
    freeze_s: float
    image_bytes: int


@dataclass(frozen=True, slots=True)
class SentResult:
    """One streamed directory: what crossed the link, and what the destination must hold."""

    bytes_sent: int
    """Bytes on the wire (the file bytes unless compression is on)."""
    seconds: float
    files: int = 0
    file_bytes: int = 0


class SourcePort(Protocol):
    """The source node's side: checkpoint the service, bring it back, clean up."""

    async def checkpoint(self, image_dir: Path, *, leave_running: bool) -> DumpResult: ...

    async def copy_state(self) -> CopyState: ...

    async def resume(self, image_dir: Path) -> str:
        """Make the copy here run again: nothing if it runs, thaw it if paused, else restore
        it from its own complete image ``image_dir``. Returns what it did."""
        ...

    async def forget(self) -> None:
        """After the hand-over: delete the stopped container and its bundle."""
        ...

    def serve_pages(self, migration_id: str, image_dir: Path) -> None:
        """Offer the complete image's pages to the destination's lazy page server."""
        ...

    async def observe(self) -> None:
        """Just before the freeze, while the devices' traffic still flows: note what the
        service touched since the migration began (lazy techniques; nothing otherwise)."""
        ...

    async def accessed(self) -> dict[int, list[tuple[int, int, int]]]:
        """Per task (by the id of its pagemap), ``(start, end, referenced bytes)`` of each
        mapping the service touched since the migration began; empty if unknown."""
        ...

    async def written_pages(self, limit: int) -> dict[int, list[int]]:
        """Per task, up to ``limit`` pages the service wrote since the migration began (its
        working set, as :meth:`observe` found it); empty if unknown."""
        ...

    async def live_copy(self, out_dir: Path) -> int:
        """While the service runs, write into ``out_dir`` a copy of its small memory (the pages
        a lazy dump keeps, heaps, stacks: ``runtime/snapshot``) as an image set; the pages
        copied (0 if unknown)."""
        ...

    def stop_serving_pages(self, migration_id: str) -> None: ...


class PeerPort(Protocol):
    """The destination agent, reached over the data link."""

    async def call(self, request: Request, *, timeout: float) -> Reply | Refused:
        """Make one typed call; a transport failure or a remote error raises a FogmigError."""
        ...

    async def send_dir(
        self, migration_id: str, local_dir: Path, subdir: str, progress: ProgressFn | None = None
    ) -> SentResult: ...

    async def close(self) -> None: ...
