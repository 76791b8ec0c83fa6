"""The source node's side of a migration: the real ports, one outgoing migration, recovery.

:class:`RuntimeSource` checkpoints and resumes the service with runc/CRIU on this node;
:class:`ChannelPeer` makes typed calls to the destination agent over the authenticated
transfer channel (reconnecting after a broken connection). :func:`begin_migration` checks a
migration, journals it and returns its driver; :func:`recover_migrations` rebuilds the drivers
of the migrations a stopped agent left unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogmig.platform.base.errors import (
    ConfigError,
    ContainerNotFoundError,
    FogmigError,
    MigrationError,
)
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration.cold import Cold
from fogmig.platform.migration.context import MigrationContext, Moves, ProgressEvent
from fogmig.platform.migration.engine import Deliver, Hook, JournalWriter, SourceDriver, _nothing
from fogmig.platform.migration.handover.events import Ids, RuntimeReport
from fogmig.platform.migration.handover.journal import (
    AnyEntry,
    Begin,
    Finished,
    MigrationEntry,
    Published,
    by_migration,
)
from fogmig.platform.migration.handover.messages import (
    Refused,
    Reply,
    Request,
    decode_reply,
    encode_call,
)
from fogmig.platform.migration.handover.ownership import Timing
from fogmig.platform.migration.handover.recovery import begin_of
from fogmig.platform.migration.handover.source_core import Plan, SourceCore
from fogmig.platform.migration.hybrid import Hybrid
from fogmig.platform.migration.lazy.kept import write_base
from fogmig.platform.migration.lazy.sources import LocalImagePages
from fogmig.platform.migration.ports import (
    CopyState,
    DumpResult,
    PeerPort,
    ProgressFn,
    SentResult,
)
from fogmig.platform.migration.postcopy import Postcopy
from fogmig.platform.migration.precopy import Precopy
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.runtime.access import (
    PageDigests,
    accessed_regions,
    by_task,
    clear_accessed,
    page_digests,
    ranked_written,
)
from fogmig.platform.runtime.bundle import read_config
from fogmig.platform.runtime.container import NodeRuntime, runc_running
from fogmig.platform.runtime.snapshot import live_copy as live_copy_of
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.platform.transfer.client import TransferClient
from fogmig.platform.transfer.protection import ChannelSecurity
from fogmig.policies.conditions import PrecopyStopRules

log = logging.getLogger(__name__)

TECHNIQUES: dict[Technique, Callable[[], Moves]] = {
    Technique.COLD: Cold,
    Technique.PRECOPY: Precopy,
    Technique.POSTCOPY: Postcopy,
    Technique.HYBRID: Hybrid,
}


CHECKPOINT_WAIT_S = 120.0


def new_migration_id(service: str) -> str:
    return f"{service}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


class RuntimeSource:
    """:class:`SourcePort` over runc/CRIU for service ``service`` on this node."""

    def __init__(
        self,
        *,
        runtime: NodeRuntime,
        service: str,
        bundle: Path,
        pages: dict[str, Any],
        lazy: bool = False,
        digests: dict[int, PageDigests] | None = None,
    ) -> None:
        self.runtime = runtime
        self.service = service
        self.bundle = bundle
        self._pages = pages  # the agent's registry of images offered to lazy page servers
        self._lazy = lazy
        self._digests = digests  # the service's pages when the migration began (lazy only)
        self._accessed: dict[int, list[tuple[int, int, int]]] | None = None
        self._written: list[tuple[int, int]] = []  # (task, vaddr), the most wanted first

    async def checkpoint(self, image_dir: Path, *, leave_running: bool) -> DumpResult:
        work = image_dir.with_name(image_dir.name + ".work")
        result = await self.runtime.checkpoint(
            self.service, image_dir=image_dir, work_dir=work, leave_running=leave_running
        )
        frozen = result.frozen_ms
        return DumpResult(
            image_dir=image_dir,
            duration_s=result.wall_s,
            freeze_s=(frozen / 1000.0) if frozen is not None else result.wall_s,
            image_bytes=result.image_bytes,
        )

    async def copy_state(self) -> CopyState:
        try:
            status = (await self.runtime.state(self.service)).status
        except ContainerNotFoundError:
            return "absent"
        return "running" if status == "running" else "paused" if status == "paused" else "absent"

    async def resume(self, image_dir: Path) -> str:
        state = await self.copy_state()
        if state == "running":
            return "still running"
        if state == "paused":
            await self.runtime.resume(self.service)
            return "thawed"
        if not (image_dir / "inventory.img").exists():
            raise MigrationError(
                f"{self.service} neither runs on {self.runtime.node} nor has an image in "
                f"{image_dir}",
                phase="rolling_back",
                migration_id=image_dir.parent.name,
                hint="nothing is left to resume; redeploy the service",
            )
        with contextlib.suppress(ContainerNotFoundError):
            await self.runtime.delete(self.service, force=True)
        await self.runtime.restore(
            self.service,
            bundle=self.bundle,
            image_dir=image_dir,
            work_dir=image_dir.with_name("rollback.work"),
        )
        return f"restored from {image_dir}"

    async def forget(self) -> None:
        with contextlib.suppress(ContainerNotFoundError):
            await self.runtime.delete(self.service, force=True)
        remove_tree(self.bundle)

    def serve_pages(self, migration_id: str, image_dir: Path) -> None:
        self._pages[migration_id] = LocalImagePages(image_dir)

    async def observe(self) -> None:
        if not self._lazy:
            return
        self._accessed = await self._read_accessed()
        before, self._digests = self._digests, None
        if not before:
            return
        try:
            pid = (await self.runtime.state(self.service)).pid
            if pid:
                after = await asyncio.to_thread(page_digests, pid)
                self._written = ranked_written(before, after)
        except (FogmigError, OSError) as exc:
            log.info("no working set of %s: %s", self.service, exc)

    async def _read_accessed(self) -> dict[int, list[tuple[int, int, int]]]:
        try:
            pid = (await self.runtime.state(self.service)).pid
            regions = await asyncio.to_thread(accessed_regions, pid) if pid else {}
        except (FogmigError, OSError) as exc:
            log.info("no accessed memory of %s: %s", self.service, exc)
            return {}
        return {
            task: [(r.start, r.end, r.referenced) for r in found if r.referenced]
            for task, found in regions.items()
        }

    async def accessed(self) -> dict[int, list[tuple[int, int, int]]]:
        if self._accessed is None:
            self._accessed = await self._read_accessed()
        return self._accessed

    async def written_pages(self, limit: int) -> dict[int, list[int]]:
        return by_task(self._written[: max(0, limit)])

    async def live_copy(self, out_dir: Path) -> int:
        try:
            pid = (await self.runtime.state(self.service)).pid
            if not pid:
                return 0
            snapshot = await asyncio.to_thread(live_copy_of, pid)
        except (FogmigError, OSError) as exc:
            log.info("no live copy of %s: %s", self.service, exc)
            return 0
        return await asyncio.to_thread(write_base, out_dir, snapshot)

    def stop_serving_pages(self, migration_id: str) -> None:
        pages = self._pages.pop(migration_id, None)
        if pages is not None:
            pages.close()


class ChannelPeer:
    """:class:`PeerPort` over the authenticated transfer channel to the destination.

    One connection at a time, opened on first use and opened again after it broke (a call
    that timed out closes it: a late reply must never answer a later call).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: ChannelSecurity,
        peer: str,
        compress: bool = False,
        connect_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.security = security
        self.peer = peer
        self.compress = compress
        self.connect_timeout = connect_timeout
        self._client: TransferClient | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> TransferClient:
        async with self._lock:
            if self._client is not None and self._client.usable:
                return self._client
            await self._drop()
            stack = contextlib.AsyncExitStack()
            try:
                client = await stack.enter_async_context(
                    TransferClient.connect(
                        self.host,
                        self.port,
                        security=self.security,
                        peer=self.peer,
                        timeout=self.connect_timeout,
                    )
                )
            except BaseException:
                await stack.aclose()
                raise
            self._client, self._stack = client, stack
            return client

    async def _drop(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(FogmigError, OSError):
                await stack.aclose()

    async def call(self, request: Request, *, timeout: float) -> Reply | Refused:
        op, params = encode_call(request)
        async with asyncio.timeout(timeout):
            client = await self._connected()
            result = await client.call(op, params)
        return decode_reply(op, result)

    async def send_dir(
        self, migration_id: str, local_dir: Path, subdir: str, progress: ProgressFn | None = None
    ) -> SentResult:
        client = await self._connected()
        stats = await client.send_dir(
            migration_id, local_dir, subdir, compress=self.compress, progress=progress
        )
        # What crossed the link: equal to the file bytes unless compression is on.
        return SentResult(
            bytes_sent=stats.wire_bytes,
            seconds=stats.seconds,
            files=stats.files,
            file_bytes=stats.bytes,
        )

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceNode:
    """What every outgoing migration of one node shares."""

    runtime: NodeRuntime
    security: ChannelSecurity
    """This node's identity on the transfer channel."""
    peers: Mapping[str, str]
    """Node name -> data IP."""
    transfer_port: int
    workdir_root: Path
    """``<node dir>/outgoing``: one directory per migration, its image of the freeze inside."""
    bundles: Path
    """Where the node's service bundles are (``<node dir>/bundles``)."""
    pages: dict[str, Any]
    journal: JournalWriter
    timing: Timing
    deliver: Deliver
    connect_timeout: float = 10.0
    ids: Ids = field(default_factory=Ids)


class Unreachable:
    """:class:`PeerPort` of a destination this node no longer has a link to (a migration
    recovered after the configuration changed): every call fails, so the core settles by
    what it knows alone."""

    def __init__(self, node: str, destination: str) -> None:
        self.error = ConfigError(f"{node} has no data link to node {destination!r}")

    async def call(self, request: Request, *, timeout: float) -> Reply | Refused:
        raise self.error

    async def send_dir(
        self, migration_id: str, local_dir: Path, subdir: str, progress: ProgressFn | None = None
    ) -> SentResult:
        raise self.error

    async def close(self) -> None:
        return None


def _peer(node: SourceNode, destination: str, compress: bool) -> ChannelPeer:
    ip = node.peers.get(destination)
    if ip is None:
        raise ConfigError(f"{node.runtime.node} has no data link to node {destination!r}")
    return ChannelPeer(
        host=ip,
        port=node.transfer_port,
        security=node.security,
        peer=destination,
        compress=compress,
        connect_timeout=min(node.connect_timeout, node.timing.call_timeout_s),
    )


async def begin_migration(
    node: SourceNode,
    *,
    service: str,
    destination: str,
    technique: Technique,
    epoch: int,
    rules: PrecopyStopRules | None = None,
    compression: bool = False,
    on_progress: ProgressEvent | None = None,
    migration_id: str | None = None,
    command_id: str | None = None,
    record_extra: Mapping[str, Any] | None = None,
    freezing: Hook = _nothing,
    resumed: Hook = _nothing,
) -> SourceDriver:
    """Check a migration of ``service``, journal it (``Begin``) and return its driver.

    Raises a FogmigError (nothing journaled, nothing touched) when it cannot start; once this
    returned, the migration ends with exactly one terminal event.
    """
    runtime = node.runtime
    if node.security.node != runtime.node:
        raise ConfigError(
            f"the transfer identity is node {node.security.node}'s, this is {runtime.node}",
            hint="give the agent its own node's certificate",
        )
    try:
        state = await runtime.state(service)
    except ContainerNotFoundError:
        raise MigrationError(
            f"{service} does not run on {runtime.node}", phase="pending", migration_id="-"
        ) from None
    if not state.running or state.bundle is None:
        raise MigrationError(
            f"{service} on {runtime.node} is {state.status}", phase="pending", migration_id="-"
        )
    args = read_config(state.bundle)["process"]["args"]
    digests: dict[int, PageDigests] | None = None
    if technique.lazy and state.pid:
        # From now on the kernel marks what the service touches: a lazy restore streams
        # those mappings first, and the pages written from now to the freeze go with the
        # execution state (runtime/access.py).
        with contextlib.suppress(OSError):
            await asyncio.to_thread(clear_accessed, state.pid)
        with contextlib.suppress(OSError):
            digests = await asyncio.to_thread(page_digests, state.pid)
    mid = migration_id or new_migration_id(service)
    record = MigrationRecord(
        migration_id=mid,
        service=service,
        source=runtime.node,
        destination=destination,
        technique=technique,
        compression=compression,
        **dict(record_extra or {}),
    )
    moves = TECHNIQUES[technique]()
    plan = Plan(
        migration_id=mid,
        service=service,
        source=runtime.node,
        destination=destination,
        technique=technique,
        epoch=epoch,
        args=tuple(args),
        live_moves=moves.live,
        restore=moves.restore_call(mid),
        command_id=command_id,
    )
    workdir = node.workdir_root / mid
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = MigrationContext(
        record=record,
        source=RuntimeSource(
            runtime=runtime,
            service=service,
            bundle=state.bundle,
            pages=node.pages,
            lazy=technique.lazy,
            digests=digests,
        ),
        peer=_peer(node, destination, compression),
        workdir=workdir,
        rules=rules or PrecopyStopRules(),
        on_progress=on_progress,
    )
    driver = SourceDriver(
        core=SourceCore(plan=plan, timing=node.timing, ids=node.ids),
        ctx=ctx,
        moves=moves,
        journal=node.journal,
        deliver=node.deliver,
        timing=node.timing,
        freezing=freezing,
        resumed=resumed,
    )
    try:
        await driver.begin()
    except BaseException:
        with contextlib.suppress(FogmigError, OSError):
            remove_tree(workdir)
        raise
    return driver


def leftovers(entries: Sequence[AnyEntry], workdir_root: Path) -> list[Path]:
    """Directories of outgoing migrations that ended and need nothing any more: all but
    those unfinished and those that failed after the commit (an operator's evidence)."""
    keep = set(unfinished(entries))
    for entry in entries:
        if isinstance(entry, Finished) and entry.outcome == Outcome.FAILED_AFTER_COMMIT:
            keep.add(entry.migration_id)
    known = {mid for mid, mine in by_migration(entries).items() if begin_of(mine) is not None}
    if not workdir_root.is_dir():
        return []
    return sorted(p for p in workdir_root.iterdir() if p.name in known - keep)


def unfinished(entries: Sequence[AnyEntry]) -> dict[str, list[MigrationEntry]]:
    """The outgoing migrations of a journal that are not finished and published."""
    out = {}
    for mid, mine in by_migration(entries).items():
        if not any(isinstance(e, Begin) for e in mine):
            continue
        kinds = {type(e) for e in mine}
        if Finished in kinds and Published in kinds:
            continue
        out[mid] = mine
    return out


async def recover_migrations(
    node: SourceNode,
    entries: Sequence[AnyEntry],
    *,
    resumed: Callable[[str, str], Hook] | None = None,
) -> list[SourceDriver]:
    """The drivers that finish the outgoing migrations a stopped agent left unfinished.

    Each one continues from its journal (resume here, finish the hand-over, settle with the
    destination, or publish the outcome again); run them like any other driver.
    """
    for path in leftovers(entries, node.workdir_root):
        log.warning("removing %s: its migration has ended", path)
        with contextlib.suppress(OSError, FogmigError):
            remove_tree(path)
    drivers = []
    for mid, mine in unfinished(entries).items():
        begin = next(e for e in mine if isinstance(e, Begin))
        workdir = node.workdir_root / mid
        waited = 0.0
        while runc_running(node.runtime.runc_root, begin.service, "checkpoint"):
            if waited > CHECKPOINT_WAIT_S:
                log.error("migration %s: a checkpoint of %s still runs", mid, begin.service)
                break
            await asyncio.sleep(0.1)  # a freeze the stopped agent started may still finish
            waited += 0.1
        source = RuntimeSource(
            runtime=node.runtime,
            service=begin.service,
            bundle=node.bundles / begin.service,
            pages=node.pages,
        )
        report = RuntimeReport(
            container=await source.copy_state(),
            image=(workdir / "final" / "inventory.img").exists(),
        )
        core, actions = SourceCore.recover(
            entries=mine,
            runtime=report,
            source=node.runtime.node,
            timing=node.timing,
            ids=node.ids,
            now=time.monotonic(),
        )
        record = MigrationRecord(
            migration_id=mid,
            service=begin.service,
            source=node.runtime.node,
            destination=begin.destination,
            technique=begin.technique,
        )
        peer: PeerPort
        try:
            peer = _peer(node, begin.destination, False)
        except ConfigError:
            peer = Unreachable(node.runtime.node, begin.destination)
        ctx = MigrationContext(record=record, source=source, peer=peer, workdir=workdir)
        driver = SourceDriver(
            core=core,
            ctx=ctx,
            moves=None,
            journal=node.journal,
            deliver=node.deliver,
            timing=node.timing,
            resumed=resumed(begin.service, mid) if resumed is not None else _nothing,
        )
        driver.recovered(actions)
        log.warning(
            "migration %s of %s to %s: continuing after a restart (%s)",
            mid,
            begin.service,
            begin.destination,
            report,
        )
        drivers.append(driver)
    return drivers


async def finish(driver: SourceDriver) -> MigrationRecord:
    """Run ``driver`` to its end; the migration's directory goes unless the outcome needs it."""
    try:
        await driver.run()
    finally:
        await driver.close()
    record = driver.record
    if record.outcome is not Outcome.FAILED_AFTER_COMMIT and record.outcome.terminal:
        with contextlib.suppress(OSError, FogmigError):
            remove_tree(driver.ctx.workdir)
    return record
