"""The paper's own toolchain as a baseline: runc, CRIU and rsync over ssh, run like its scripts.

:func:`run_baseline` moves a deployed service between two testbed nodes the way the paper's
shell scripts did (section 4.2): cold is checkpoint, rsync, restore; pre-copy adds a
``--pre-dump`` round and a final dump with ``--parent-path``; post-copy is a lazy checkpoint
with CRIU's page server, ``criu lazy-pages`` and a lazy restore; hybrid is a pre-dump, then
post-copy. Each step is timed around its command, as the paper's ``time`` did, and the bytes
are those rsync reports as sent. The result is a fogmig :class:`MigrationRecord` whose id
starts with ``baseline-`` (engine ``runc-rsync``). A step this kernel refuses ends the record
with the tool's own error; the service then still runs on the source.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path
from typing import Final

from fogmig.experiments import baseline_cmds as cmds
from fogmig.experiments.baseline_check import DeviceCheck
from fogmig.experiments.baseline_lazy import (
    lazy_checkpoint,
    start_lazy_daemon,
    stop_lazy,
    wait_lazy,
)
from fogmig.experiments.baseline_ssh import SshLink
from fogmig.experiments.baseline_steps import (
    Move,
    StepFailed,
    checkpoint,
    restore,
    rsync,
    tree_bytes,
)
from fogmig.platform.agent.status import rss, service_params
from fogmig.platform.base import paths
from fogmig.platform.base.errors import (
    ConfigError,
    FogmigError,
    ServiceError,
)
from fogmig.platform.base.vocabulary import Outcome, Phase, Technique
from fogmig.platform.migration.record import MigrationRecord, Round
from fogmig.platform.runtime.bundle import make_bundle, read_config
from fogmig.platform.runtime.cgroups import bundle_cgroups_path, prune_cgroup
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.platform.testbed.state import TestbedState, load_state
from fogmig.services.deploy import bundle_dir, find_service, netns_path, node_runtime

ENGINE: Final = "runc-rsync"
ID_PREFIX: Final = "baseline-"
DEFAULT_SSH_PORT: Final = 2222
DEFAULT_PAGE_SERVER_PORT: Final = 27027


def engine_of(record: MigrationRecord) -> str:
    """The engine that made a record: this baseline, or fogmig's own."""
    return ENGINE if record.migration_id.startswith(ID_PREFIX) else "fogmig"


def new_migration_id(service: str) -> str:
    return f"{ID_PREFIX}{service}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


async def run_baseline(
    service: str,
    destination: str,
    technique: Technique,
    *,
    state: TestbedState | None = None,
    ssh_port: int = DEFAULT_SSH_PORT,
    page_server_port: int = DEFAULT_PAGE_SERVER_PORT,
    timeout_s: float = 600.0,
    readings: int = 3,
) -> MigrationRecord:
    """Move ``service`` (running on one testbed node) to ``destination`` with ``technique``.

    Before the move a device posts ``readings`` readings; afterwards the service must answer
    on the destination with the same counter and running hash, accept one more reading, and
    no longer run on the source. The record's outcome is ``completed`` then; ``rolled_back``
    when a step failed while the service still ran on the source (such as a pre-dump this
    kernel refuses), ``failed_after_commit`` when it failed after the source had dumped.
    """
    state = state or load_state()
    move = await _prepare(
        service,
        destination,
        technique=technique,
        state=state,
        page_server_port=page_server_port,
        timeout_s=timeout_s,
    )
    record = move.record
    device = DeviceCheck(state=state, service=service, port=_port(move.source_bundle))
    try:
        await device.before(move.source, readings)
        async with SshLink(
            source_netns=move.source_netns,
            dest_netns=move.dest_netns,
            dest_address=state.node(destination).data_ip,
            port=ssh_port,
        ) as link:
            record.started_at = time.time()
            try:
                await _migrate(move, link)
                record.outcome = Outcome.COMPLETED
            except StepFailed as exc:
                record.error = str(exc.cause)
                record.failed_phase = exc.phase
                record.outcome = (
                    Outcome.FAILED_AFTER_COMMIT if move.source_dumped else Outcome.ROLLED_BACK
                )
            finally:
                record.finished_at = time.time()
                await stop_lazy(move)
        if record.outcome is Outcome.COMPLETED:
            problems = await device.after(move.destination, move.source)
            if problems:
                record.outcome = Outcome.FAILED_AFTER_COMMIT
                record.error = "; ".join(problems)
                record.failed_phase = "verify"
        elif not move.source_dumped:
            problems = await device.after(move.source, move.destination)
            if problems:
                record.error = f"{record.error}; after the failure: {'; '.join(problems)}"
        record.mark(
            Phase.DONE if record.outcome is Outcome.COMPLETED else Phase.FAILED, time.time()
        )
    finally:
        await _clean_up(move)
    return record


def _port(bundle: Path) -> int:
    return service_params(bundle)[2]


async def _prepare(
    service: str,
    destination: str,
    *,
    technique: Technique,
    state: TestbedState,
    page_server_port: int,
    timeout_s: float,
) -> Move:
    running = [p for p in await find_service(service) if p.container.running]
    if not running:
        raise ServiceError(f"service {service} runs on no node", hint="`fogmig deploy` it first")
    placement = running[0]
    source = placement.node
    state.node(destination)
    if source == destination:
        raise ConfigError(f"service {service} already runs on {destination}")
    if await node_runtime(destination).exists(service):
        raise ServiceError(
            f"node {destination} already has a container {service}",
            hint=f"`fogmig undeploy {service}` and deploy it again",
        )
    source_bundle = placement.container.bundle
    if source_bundle is None:
        raise ServiceError(f"service {service} on {source} has no bundle")
    config = read_config(source_bundle)
    # The destination's bundle exists before the migration starts, as on the paper's
    # nodes: same image and command, the destination's namespace and cgroup.
    dest_bundle = make_bundle(
        bundle_dir(destination, service),
        rootfs=Path(config["root"]["path"]),
        args=config["process"]["args"],
        netns_path=netns_path(state.node(destination).netns),
        restore_conf=True,
        cgroups_path=f"/fogmig/{destination}/{service}",
        hostname=service,
    )
    migration_id = new_migration_id(service)
    _, dirty_kbps, _ = service_params(source_bundle)
    link = state.link(source, destination)
    record = MigrationRecord(
        migration_id=migration_id,
        service=service,
        source=source,
        destination=destination,
        technique=technique,
        compression=False,
        state_bytes=rss(placement.container.pid),
        dirty_rate_bytes_per_s=dirty_kbps * 1024,
        link_rate_bit_per_s=link.rate_mbit * 1e6,
        link_rtt_s=link.rtt_ms / 1000,
    )
    root = paths.state_dir() / "baseline" / migration_id
    return Move(
        service=service,
        technique=technique,
        source=source,
        destination=destination,
        source_netns=state.node(source).netns,
        dest_netns=state.node(destination).netns,
        source_ip=state.node(source).data_ip,
        source_bundle=source_bundle,
        dest_bundle=dest_bundle,
        src=cmds.ImageLayout(root / "source"),
        dst=cmds.ImageLayout(root / "destination"),
        page_server_port=page_server_port,
        timeout_s=timeout_s,
        record=record,
    )


async def _migrate(move: Move, link: SshLink) -> None:
    r = move.record
    t = move.technique
    parent: str | None = None
    if t in cmds.PRE_DUMP_TECHNIQUES:
        r.mark(Phase.PRECOPY, time.time())
        r.pre_dump_time_s = await checkpoint(move, "pre_dump", move.src.pre_dump, pre_dump=True)
        moved = await rsync(link, move, "pre_dump_transfer", move.src.pre_dump, move.dst.pre_dump)
        r.pre_dump_transfer_time_s, r.pre_dump_bytes = moved.seconds, moved.bytes_sent
        r.rounds.append(
            Round(
                index=0,
                dump_time_s=r.pre_dump_time_s,
                freeze_time_s=r.pre_dump_time_s,
                transfer_time_s=moved.seconds,
                bytes_dumped=tree_bytes(move.src.pre_dump),
                bytes_sent=moved.bytes_sent,
            )
        )
        parent = cmds.PARENT_LINK
    r.mark(Phase.DUMPING, time.time())
    if t in cmds.LAZY_TECHNIQUES:
        r.dump_time_s = await lazy_checkpoint(move, parent)
    else:
        r.dump_time_s = await checkpoint(move, "dump", move.src.final, parent=parent)
    move.source_dumped = True
    r.mark(Phase.TRANSFERRING, time.time())
    moved = await rsync(link, move, "dump_transfer", move.src.final, move.dst.final)
    r.dump_transfer_time_s, r.dump_bytes = moved.seconds, moved.bytes_sent
    r.rounds.append(
        Round(
            index=len(r.rounds),
            final=True,
            dump_time_s=r.dump_time_s,
            freeze_time_s=r.dump_time_s,
            transfer_time_s=moved.seconds,
            bytes_dumped=tree_bytes(move.src.final),
            bytes_sent=moved.bytes_sent,
        )
    )
    lazy = t in cmds.LAZY_TECHNIQUES
    if lazy:
        await start_lazy_daemon(move)
    r.mark(Phase.RESTORING, time.time())
    r.resume_time_s = await restore(move, lazy=lazy)
    move.restored = True
    if lazy:
        r.mark(Phase.LAZY_PAGES, time.time())
        r.faulted_pages_transfer_time_s = await wait_lazy(move)
    r.mark(Phase.COMMITTED, time.time())


# ---------------------------------------------------------------- steps


async def _clean_up(move: Move) -> None:
    """Images, work directories and the bundle of the side that no longer runs the service."""
    src_rt, dst_rt = node_runtime(move.source), node_runtime(move.destination)
    completed = move.record.outcome is Outcome.COMPLETED
    if completed or move.source_dumped:
        # runc removes a checkpointed container; a stopped leftover would still be listed.
        with contextlib.suppress(FogmigError):
            st = await src_rt.state(move.service)
            if not st.running:
                await src_rt.delete(move.service, force=True)
    if not move.restored:
        with contextlib.suppress(FogmigError):
            if await dst_rt.exists(move.service):
                await dst_rt.delete(move.service, force=True)
        prune_cgroup(bundle_cgroups_path(move.dest_bundle))
        remove_tree(move.dest_bundle)
    elif completed:
        prune_cgroup(bundle_cgroups_path(move.source_bundle))
        remove_tree(move.source_bundle)
    # remove_tree unmounts what CRIU left mounted below it before it deletes anything.
    remove_tree(move.src.root.parent)
