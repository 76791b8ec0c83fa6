"""The errors of lazy pages: preparing the layout, serving pages, judging the daemon.

Kept apart so that every lazy module and its callers share one tree of
:class:`~fogmig.platform.base.errors.FogmigError` subclasses.
"""

from __future__ import annotations

from fogmig.platform.base.errors import CriuError, FogmigError, TransferError


class LazyPagesError(FogmigError):
    """Lazy pages could not be prepared, served or delivered."""


class LazyLayoutError(LazyPagesError):
    """A dump cannot be turned into a lazy layout (incremental, truncated, unexpected files)."""


class PageServerError(TransferError):
    """The page server could not answer a request of the lazy-pages daemon."""


class PageNotFoundError(PageServerError):
    """No page source holds a page at the requested address of that task."""

    def __init__(self, pid_id: int, vaddr: int) -> None:
        self.pid_id = pid_id
        self.vaddr = vaddr
        super().__init__(f"no page of task {pid_id} at {vaddr:#x}")


class LazyPagesFailed(CriuError):
    """The lazy-pages daemon failed or did not deliver every page of every task."""
