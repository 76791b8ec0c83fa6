"""The destination's runtime work for one incoming migration: files, restore, lazy pages.

An :class:`Arrival` holds what one migration has set up on this node (its bundle, page
server, lazy-pages daemon, channels back to the source) and performs the runtime steps the
destination core asks for: check streamed files, apply a page delta, restore (at once, or
lazily with fogmig's page server in front of CRIU's lazy-pages daemon), and release it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fogmig.platform.base.errors import ConfigError, ContainerNotFoundError, FogmigError
from fogmig.platform.base.nodes import netns_name
from fogmig.platform.migration.delta import apply as delta_apply
from fogmig.platform.migration.delta.link import apply_delta_linked
from fogmig.platform.migration.handover.messages import ApplyDelta, Restore, SendFiles
from fogmig.platform.migration.lazy.daemon import LazyPagesDaemon
from fogmig.platform.migration.lazy.hot import read_hot
from fogmig.platform.migration.lazy.kept import decode_kept
from fogmig.platform.migration.lazy.layout import lazy_vaddrs
from fogmig.platform.migration.lazy.plan import read_accessed
from fogmig.platform.migration.lazy.server import LazyPageServer, LazyServeStats
from fogmig.platform.migration.lazy.sources import (
    LayeredPages,
    LocalImagePages,
    PageSource,
    RemotePages,
)
from fogmig.platform.migration.lazy.stream import DEFAULT_FAULT_AROUND, FetchRuns, StreamedPages
from fogmig.platform.migration.lazy.warm import fill_from_base
from fogmig.platform.runtime.bundle import make_bundle
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.runtime.workdir import remove_tree

log = logging.getLogger(__name__)

Fetch = Callable[[int, int, int], Awaitable[bytes]]


@dataclass(slots=True)
class WireCount:
    """What the pages of one lazy restore cost on the link (compressed where that paid)."""

    bytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PageChannels:
    """Authenticated channels back to the source for the pages of one lazy restore."""

    demand: Fetch
    """Faults: a channel of their own, so that they never queue behind the stream."""
    ahead: list[FetchRuns]
    """The stream: one request in flight per channel."""
    close: Callable[[], Awaitable[None]]
    wire: WireCount = field(default_factory=WireCount)
    """Filled by the fetchers: the bytes that crossed, not the pages they decoded to."""
    fault_around: int = DEFAULT_FAULT_AROUND
    """Pages fetched with each fault (``lazy.stream.fault_pages``)."""


FetchFactory = Callable[[str, str], Awaitable[PageChannels]]
"""(source node, migration id) -> the page channels of that migration."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LazyResult:
    """How the lazy transfer ended, and the numbers the source puts in its record."""

    ok: bool
    detail: str
    remote_bytes: int
    remote_pages: int
    local_pages: int
    seconds: float
    wire_bytes: int = 0
    """What the remote pages cost on the link (0: not counted)."""


@dataclass(slots=True, kw_only=True)
class Arrival:
    """One migration arriving at this node, as its runtime sees it."""

    migration_id: str
    service: str
    source: str
    """The source node (the lazy pages come back from it)."""
    args: list[str]
    """The service's process arguments, for the bundle."""
    directory: Path
    """``<node dir>/incoming/<migration id>``: the streamed files land here."""
    bundle: Path
    bundle_made: bool = False
    """Whether this migration wrote the bundle (only then does it remove it)."""
    lazy: LazyPagesDaemon | None = None
    page_server: LazyPageServer | None = None
    stream: StreamedPages | None = None
    local_pages: LocalImagePages | None = None
    """Hybrid: the last pre-copy round's pages here (open files, closed at release)."""
    channels: asyncio.Task[PageChannels] | None = None
    """The page channels, opened when the migration was prepared: their handshakes then
    happen while the service still runs, not in the frozen window."""
    restore_task: asyncio.Task[None] | None = None
    """The restore under way or done (the fence is released only once it ended)."""
    restored_at: float = 0.0
    """When the restore returned (monotonic seconds)."""
    restore_seconds: float = 0.0
    prelude_seconds: float = 0.0
    """Time spent on the final data call that came with the restore."""
    wire: WireCount | None = None
    """What the lazy pages cost on the link so far (set by a lazy restore)."""
    pid: int | None = None
    """The restored service's init pid."""
    lazy_result: LazyResult | None = None
    """How the lazy transfer ended, once it has."""

    def sub(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"invalid image directory name {name!r}")
        return self.directory / name

    def stats(self) -> LazyServeStats | None:
        return self.page_server.stats if self.page_server is not None else None

    # ------------------------------------------------------------------ data

    async def take_files(self, call: SendFiles) -> None:
        """Check that a streamed directory arrived whole (the channel verified each file)."""
        root = self.sub(call.name)
        files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        size = sum(p.stat().st_size for p in files)
        if len(files) != call.files or size != call.bytes:
            raise ConfigError(
                f"{root} holds {len(files)} files, {size} bytes; the source sent "
                f"{call.files} files, {call.bytes} bytes"
            )

    async def apply_delta(self, call: ApplyDelta) -> float:
        base, delta, out = self.sub(call.base), self.sub(call.delta), self.sub(call.out)
        if call.link:
            # The base stays: the restore reads its unchanged pages through the link.
            stats = await asyncio.to_thread(apply_delta_linked, base, delta, out)
            await asyncio.to_thread(shutil.rmtree, delta)
            return stats.seconds
        stats = await asyncio.to_thread(delta_apply.apply_delta, base, delta, out)
        await asyncio.to_thread(shutil.rmtree, delta)
        if base != out:
            await asyncio.to_thread(shutil.rmtree, base)
        return stats.seconds

    # ------------------------------------------------------------------ page channels

    def open_channels(self, fetch_factory: FetchFactory) -> None:
        """Start opening the page channels back to the source (a lazy restore will use them)."""
        if self.channels is None:
            self.channels = asyncio.ensure_future(fetch_factory(self.source, self.migration_id))
            # Retrieved at the restore; a failure here is only logged once it is known.
            self.channels.add_done_callback(_log_failed_channels)

    async def _page_channels(self, fetch_factory: FetchFactory) -> PageChannels:
        """The channels opened ahead if they are there, else opened now."""
        task = self.channels
        if task is not None:
            with contextlib.suppress(FogmigError, OSError):
                return await asyncio.shield(task)
        self.channels = asyncio.ensure_future(fetch_factory(self.source, self.migration_id))
        return await self.channels

    # ------------------------------------------------------------------ restore

    def make_bundle(self, *, rootfs: Path, node: str) -> None:
        self.bundle = make_bundle(
            self.bundle,
            rootfs=rootfs,
            args=self.args,
            netns_path=Path("/var/run/netns") / netns_name(node),
            restore_conf=True,
            cgroups_path=f"/fogmig/{node}/{self.service}",
            hostname=self.service,
        )
        self.bundle_made = True

    async def restore(
        self, call: Restore, *, runtime: NodeRuntime, fetch_factory: FetchFactory
    ) -> None:
        """Restore the service here; with ``lazy`` mode its memory faults in from the source."""
        images = self.sub(call.images)
        work = self.directory / "restore-work"
        started = time.monotonic()
        if call.mode == "full":
            result = await runtime.restore(
                self.service, bundle=self.bundle, image_dir=images, work_dir=work
            )
            self.restored_at = time.monotonic()
            self.restore_seconds, self.pid = self.restored_at - started, result.pid
            return
        channels = await self._page_channels(fetch_factory)
        self.wire = channels.wire
        remote = RemotePages(channels.demand)
        source: PageSource
        if call.base:
            # Hybrid (the last pre-copy round) and post-copy (the live copy sent ahead):
            # unchanged pages from that copy here, changed ones remote.
            base = self.sub(call.base)
            await asyncio.to_thread(decode_kept, images, base)
            changed_file = images / (call.changed or "")
            changed = {
                int(pid): vaddrs for pid, vaddrs in json.loads(changed_file.read_text()).items()
            }
            if call.fill:
                filled = await asyncio.to_thread(fill_from_base, images, base, changed)
                log.info("migration %s: %d pages restored from the copy", call.migration_id, filled)
            self.stream = StreamedPages(
                remote,
                channels.ahead,
                changed,
                accessed=read_accessed(images),
                fault_around=channels.fault_around,
            )
            self.local_pages = LocalImagePages(base)
            source = (
                self.stream if call.fill else LayeredPages(self.local_pages, self.stream, changed)
            )
        else:
            self.stream = StreamedPages(
                remote,
                channels.ahead,
                lazy_vaddrs(images),
                accessed=read_accessed(images),
                fault_around=channels.fault_around,
            )
            source = self.stream
        # Hybrid's working set is coded against the base round held here.
        hot = await asyncio.to_thread(
            functools.partial(read_hot, images, base=self.local_pages if call.base else None)
        )
        if hot:
            self.stream.preload(hot)
        # No listening socket: CRIU's daemon gets a connected socket pair, so nothing else on
        # the node can read the service's memory.
        self.page_server = LazyPageServer(source=source)
        self.lazy = LazyPagesDaemon(
            image_dir=images, work_dir=work, channel=await self.page_server.channel()
        )
        await self.lazy.start()
        self.stream.start()
        restored = await runtime.restore(
            self.service, bundle=self.bundle, image_dir=images, work_dir=work, lazy_pages=True
        )
        self.restored_at = time.monotonic()
        self.restore_seconds, self.pid = self.restored_at - started, restored.pid

    async def wait_pages(self) -> LazyResult:
        """Wait for the lazy transfer to end; judged here only (daemon exit, pages counted)."""
        assert self.lazy is not None
        assert self.page_server is not None
        result = await self.lazy.wait(None, server=self.page_server)
        if self.stream is not None:
            log.info("migration %s: %s", self.migration_id, self.stream.counts.describe())
        stats = self.page_server.stats
        last = stats.last_page_at or time.monotonic()
        self.lazy_result = LazyResult(
            ok=result.ok,
            detail="" if result.ok else f"{result.describe()} (log {self.lazy.log_path})",
            remote_bytes=stats.remote_bytes,
            remote_pages=stats.remote_pages,
            local_pages=stats.local_pages,
            seconds=max(0.0, last - self.restored_at),
            wire_bytes=self.wire.bytes if self.wire is not None else 0,
        )
        return self.lazy_result

    # ------------------------------------------------------------------ the end

    async def release(self) -> None:
        """Stop the lazy machinery and close the channels back to the source (idempotent)."""
        if self.lazy is not None:
            with contextlib.suppress(FogmigError, ProcessLookupError):
                await self.lazy.kill()
        if self.stream is not None:
            await self.stream.close()
            self.stream = None
        if self.page_server is not None:
            await self.page_server.close()
            self.page_server = None
        if self.local_pages is not None:
            # Its files stay open until closed, even once the migration's directory is gone.
            self.local_pages.close()
            self.local_pages = None
        channels, self.channels = self.channels, None
        if channels is not None:
            channels.cancel()
            await asyncio.gather(channels, return_exceptions=True)
            if not channels.cancelled() and channels.exception() is None:
                with contextlib.suppress(FogmigError, OSError):
                    await channels.result().close()

    async def remove(self, *, runtime: NodeRuntime, keep_bundle: bool) -> None:
        """Remove the migration's files, and the bundle it made unless the copy is owned."""
        await self.release()
        with contextlib.suppress(FogmigError, OSError):
            await asyncio.to_thread(remove_tree, self.directory)
        if keep_bundle or not self.bundle_made:
            return
        with contextlib.suppress(ContainerNotFoundError):
            await runtime.state(self.service)
            return  # a container of that name exists: its bundle stays
        with contextlib.suppress(FogmigError, OSError):
            await asyncio.to_thread(remove_tree, self.bundle)


def _log_failed_channels(task: asyncio.Task[PageChannels]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("page channels not opened ahead (opened at the restore): %s", task.exception())
