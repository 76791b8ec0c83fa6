"""The source node's side of a migration: the real ports, and one outgoing migration.

:class:`RuntimeSource` checkpoints and restores the service with runc/CRIU on this node;
:class:`ChannelPeer` reaches the destination agent over the authenticated transfer channel.
:func:`migrate_service` runs a whole migration and returns its record.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fogmig.platform.base.errors import (
    ConfigError,
    ContainerNotFoundError,
    FogmigError,
    MigrationError,
)
from fogmig.platform.base.vocabulary import Outcome, Technique
from fogmig.platform.migration import cold, hybrid, postcopy, precopy
from fogmig.platform.migration.engine import (
    MigrationContext,
    ProgressEvent,
    TechniqueRun,
    run_migration,
)
from fogmig.platform.migration.lazy.sources import LocalImagePages
from fogmig.platform.migration.ports import DumpResult, ProgressFn, SentResult
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.runtime.bundle import read_config
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.platform.transfer.client import TransferClient
from fogmig.platform.transfer.protection import ChannelSecurity
from fogmig.policies.conditions import PrecopyStopRules

log = logging.getLogger(__name__)

TECHNIQUES: dict[Technique, TechniqueRun] = {
    Technique.COLD: cold.migrate,
    Technique.PRECOPY: precopy.migrate,
    Technique.POSTCOPY: postcopy.migrate,
    Technique.HYBRID: hybrid.migrate,
}


def new_migration_id(service: str) -> str:
    return f"{service}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


class RuntimeSource:
    """:class:`SourcePort` over runc/CRIU for service ``service`` on this node."""

    def __init__(
        self, *, runtime: NodeRuntime, service: str, bundle: Path, pages: dict[str, Any]
    ) -> None:
        self.runtime = runtime
        self.service = service
        self.bundle = bundle
        self._pages = pages  # the agent's registry of images offered to lazy page servers
        self._work_dirs: list[Path] = []

    async def checkpoint(self, image_dir: Path, *, leave_running: bool) -> DumpResult:
        work = image_dir.with_name(image_dir.name + ".work")
        self._work_dirs.append(work)
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

    async def restore_here(self, image_dir: Path) -> float:
        started = time.monotonic()
        with contextlib.suppress(ContainerNotFoundError):
            await self.runtime.delete(self.service, force=True)
        await self.runtime.restore(
            self.service,
            bundle=self.bundle,
            image_dir=image_dir,
            work_dir=image_dir.with_name("rollback.work"),
        )
        log.warning("%s restored on %s from %s", self.service, self.runtime.node, image_dir)
        return time.monotonic() - started

    async def is_running(self) -> bool:
        try:
            return (await self.runtime.state(self.service)).running
        except ContainerNotFoundError:
            return False

    async def forget(self) -> None:
        with contextlib.suppress(ContainerNotFoundError):
            await self.runtime.delete(self.service, force=True)
        remove_tree(self.bundle)

    def serve_pages(self, migration_id: str, image_dir: Path) -> None:
        self._pages[migration_id] = LocalImagePages(image_dir)

    def stop_serving_pages(self, migration_id: str) -> None:
        pages = self._pages.pop(migration_id, None)
        if pages is not None:
            pages.close()


class ChannelPeer:
    """:class:`PeerPort` over one authenticated transfer channel to the destination."""

    def __init__(self, client: TransferClient, *, compress: bool = False) -> None:
        self.client = client
        self.compress = compress

    async def call(
        self, op: str, params: Mapping[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self.client.call(op, dict(params), timeout=timeout)

    async def send_dir(
        self, migration_id: str, local_dir: Path, subdir: str, progress: ProgressFn | None = None
    ) -> SentResult:
        stats = await self.client.send_dir(
            migration_id, local_dir, subdir, compress=self.compress, progress=progress
        )
        # What crossed the link: equal to the file bytes unless compression is on.
        return SentResult(bytes_sent=stats.wire_bytes, seconds=stats.seconds)


async def migrate_service(
    *,
    runtime: NodeRuntime,
    service: str,
    destination: str,
    destination_ip: str,
    transfer_port: int,
    security: ChannelSecurity,
    technique: Technique,
    workdir_root: Path,
    pages_registry: dict[str, Any],
    rules: PrecopyStopRules | None = None,
    compression: bool = False,
    on_progress: ProgressEvent | None = None,
    migration_id: str | None = None,
    record_extra: Mapping[str, Any] | None = None,
    fence_timeout_s: float = 20.0,
    connect_timeout: float = 10.0,
) -> MigrationRecord:
    """Migrate ``service`` from this node to ``destination`` and return the record.

    ``security`` is this node's identity on the transfer channel; the destination must present
    the certificate of node ``destination``.
    """
    if security.node != runtime.node:
        raise ConfigError(
            f"the transfer identity is node {security.node}'s, this is {runtime.node}",
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
    workdir = workdir_root / mid
    workdir.mkdir(parents=True, exist_ok=True)
    source = RuntimeSource(
        runtime=runtime, service=service, bundle=state.bundle, pages=pages_registry
    )
    try:
        async with TransferClient.connect(
            destination_ip,
            transfer_port,
            security=security,
            peer=destination,
            timeout=connect_timeout,
        ) as client:
            ctx = MigrationContext(
                record=record,
                source=source,
                peer=ChannelPeer(client, compress=compression),
                workdir=workdir,
                rules=rules or PrecopyStopRules(),
                on_progress=on_progress,
                fence_timeout_s=fence_timeout_s,
                service_spec={"service": service, "args": list(args)},
            )
            await run_migration(ctx, TECHNIQUES[technique])
    except FogmigError as exc:
        # Could not even reach the destination: nothing was touched.
        if record.outcome is Outcome.RUNNING:
            record.outcome = Outcome.ROLLED_BACK
            record.error = f"{type(exc).__name__}: {exc}"
            record.failed_phase = "connect"
            record.finished_at = time.time()
    finally:
        if record.outcome is not Outcome.FAILED_AFTER_COMMIT:
            with contextlib.suppress(OSError, FogmigError):
                remove_tree(workdir)
    return record
