"""Give a long-running daemon's freed memory back to the system between bursts of work.

A migration makes an agent allocate tens of megabytes for a few seconds (page blocks, deltas,
image files read in worker threads). Python frees those objects, but glibc's allocator keeps
the freed chunks in its arenas (one per thread that allocated) and returns the top of a heap
only when it is free: one small object left above a freed megabyte pins it. Seen in a soak of
200 migrations as steps of 5-10 MB in an agent's resident size that never came back, with
nothing leaked at the Python level. ``malloc_trim(0)`` releases every free page of every
arena; it costs a few milliseconds, so the agent calls it when it is idle, not mid-migration.
:func:`tune_allocator`, called once at the start, keeps the large buffers out of the arenas in
the first place (they are mapped apart and unmapped when freed).

Without glibc (musl, another libc) :func:`release_free_memory` does nothing and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

PAGE = 4096
LOOK_INTERVAL_S = 0.5
"""How often a :class:`HeapKeeper` looks whether the work has ended."""


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter for the size from which a request gets a mapping of its own."""
MMAP_THRESHOLD_BYTES = 256 * 1024
"""Requests from this size on are mapped apart and unmapped when freed (see
:func:`tune_allocator`)."""


@cache
def libc() -> ctypes.CDLL | None:
    """The C library, or None where it cannot be found or loaded (then glibc's extras are
    left alone)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep large buffers out of the allocator's heaps; True if glibc took the setting.

    glibc maps a request of 128 KiB or more apart, but raises that threshold to the size of
    every mapped chunk freed, up to 32 MiB: after the first migration, the megabyte page
    blocks and deltas of later ones come from the heaps and leave holes there that small
    objects pin (an agent's heaps held 45 MB free after 40 migrations of a soak, with 1.4 MB
    mapped apart). A fixed threshold turns the raising off, so such buffers are always mapped
    and unmapped on free. Call it once, at the start of a daemon.
    """
    lib = libc()
    if lib is None:
        return False
    try:
        mallopt = lib.mallopt
    except AttributeError:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    lib = libc()
    if lib is None:
        return None
    try:
        trim = lib.malloc_trim
    except AttributeError:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    fn: Callable[[int], int] = trim
    return fn


def resident_bytes(status: Path = Path("/proc/self/statm")) -> int | None:
    """This process's resident set size, or None where ``/proc`` does not say."""
    try:
        fields = status.read_text().split()
        return int(fields[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Trimmed:
    """What one call of :func:`release_free_memory` did."""

    supported: bool
    released: bool
    """True when the allocator returned at least one page."""
    rss_before: int | None
    rss_after: int | None

    @property
    def freed_bytes(self) -> int:
        if self.rss_before is None or self.rss_after is None:
            return 0
        return max(0, self.rss_before - self.rss_after)


def release_free_memory() -> Trimmed:
    """Return the allocator's free pages to the system (``malloc_trim(0)``)."""
    trim = _malloc_trim()
    before = resident_bytes()
    if trim is None:
        return Trimmed(supported=False, released=False, rss_before=before, rss_after=before)
    released = bool(trim(0))
    return Trimmed(supported=True, released=released, rss_before=before, rss_after=resident_bytes())


class HeapKeeper:
    """Trims the heap once after each burst of work, when the daemon is idle again.

    ``busy`` says whether work is under way (a migration in either direction); the keeper
    looks every ``interval_s`` and trims at the first idle look after a busy one, so an idle
    daemon is not trimmed over and over and a busy one never mid-work. ``on_idle``, if given,
    runs at that same moment just before the trim (the daemon's own tidying up, whose garbage
    the trim then returns).
    """

    def __init__(
        self,
        busy: Callable[[], bool],
        *,
        interval_s: float = LOOK_INTERVAL_S,
        trim: Callable[[], Trimmed] = release_free_memory,
        on_idle: Callable[[], Awaitable[None]] | None = None,
        name: str = "daemon",
    ) -> None:
        self._busy = busy
        self._interval_s = interval_s
        self._trim = trim
        self._on_idle = on_idle
        self._name = name
        self._owed = True  # the start-up itself was a burst
        self.trims = 0

    def _due(self) -> bool:
        if self._busy():
            self._owed = True
            return False
        if not self._owed:
            return False
        self._owed = False
        return True

    def tick(self) -> Trimmed | None:
        """One look: trim if the work that was under way has ended."""
        return self._trim_now() if self._due() else None

    async def look(self) -> Trimmed | None:
        """One look as :meth:`run` takes it: at an idle moment ``on_idle`` first, then the trim."""
        if not self._due():
            return None
        if self._on_idle is not None:
            try:
                await self._on_idle()
            except Exception:  # the daemon's tidying up must never end the daemon
                log.exception("%s: the work at an idle moment failed", self._name)
        return self._trim_now()

    def _trim_now(self) -> Trimmed:
        done = self._trim()
        self.trims += 1
        if done.freed_bytes:
            log.debug("%s: returned %.1f MB to the system", self._name, done.freed_bytes / 1e6)
        return done

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.look()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
