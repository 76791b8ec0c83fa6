"""The commands a node's agent takes over the bus: migrate, deploy, undeploy and drain.

Each is acknowledged end to end; a malformed or impossible one gets a typed rejection. A
migration is accepted once it is journaled; it runs as a task of its own and ends with exactly
one MigrationDone event (``handover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from fogmig.platform.agent.handover import HandoverWiring
from fogmig.platform.agent.linkprobe import LinkProbing
from fogmig.platform.agent.status import rss, service_params
from fogmig.platform.base import fmt
from fogmig.platform.base.errors import ConfigError, FogmigError, MigrationError, UnknownNodeError
from fogmig.platform.base.vocabulary import Phase
from fogmig.platform.bus.schemas import (
    MAX_BYTES,
    MAX_RATE,
    Command,
    DeployCommand,
    DrainCommand,
    MigrateCommand,
    MigrationProgress,
    UndeployCommand,
    accept,
    command_id_of,
    reject,
)
from fogmig.platform.bus.topics import SchemaError, topics
from fogmig.platform.migration.engine import SourceDriver
from fogmig.platform.migration.source import begin_migration, new_migration_id
from fogmig.platform.runtime.capabilities import criu_capabilities

log = logging.getLogger(__name__)


class CommandHandling(HandoverWiring, LinkProbing):
    """Taking commands from the bus and driving the migrations they ask for."""

    async def _command_loop(self, stop: asyncio.Event) -> None:
        assert self.bus is not None
        async with self.bus.subscribe(topics.cmd(self.node)) as commands:
            async for topic, command in commands:
                try:
                    await self._on_command(command)  # type: ignore[arg-type]
                except Exception as exc:
                    # A broker away longer than an acknowledgement waits, or a bug one
                    # command hits: that command is lost, the agent takes the next one.
                    log.warning(
                        "agent %s: command on %s failed: %s", self.node, topic, fmt.error(exc)
                    )
                    log.debug("agent %s: the failed command: %r", self.node, command, exc_info=exc)

    def _on_invalid(self, topic: str, payload: bytes, error: SchemaError) -> None:
        """A malformed command gets a typed rejection when it names its id; the agent goes on."""
        if topic != topics.cmd(self.node) or self.bus is None:
            return
        command_id = command_id_of(payload)
        log.warning("agent %s: invalid command %s: %s", self.node, command_id, error)
        if command_id is None:
            return
        task = asyncio.ensure_future(
            self.bus.publish(topics.events(self.node), reject(self.node, command_id, error))
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_command(self, command: Command) -> None:
        assert self.bus is not None
        try:
            self.admission.admit(command.command_id, command.at, time.time())
            if isinstance(command, DrainCommand):
                # From now on the node reports draining; the controller moves its services
                # off and never onto it, and the node reports empty when they are gone.
                self.draining = True
                self.save_memory()
                await self.bus.publish(
                    topics.events(self.node), accept(self.node, command.command_id)
                )
                await self._publish_status()
                return
            if isinstance(command, DeployCommand | UndeployCommand):
                await self._deploy_command(command)
                return
            await self._check_migrate(command)
            driver = await self._begin(command)
        except FogmigError as exc:
            log.warning("agent %s: rejected %s: %s", self.node, command.command_id, exc)
            await self.bus.publish(
                topics.events(self.node), reject(self.node, command.command_id, exc)
            )
            return
        # Started before the acknowledgement: the migration is journaled and must run even
        # if the acknowledgement cannot be delivered.
        self._start_driver(driver)
        log.info(
            "agent %s: migration %s of %s to %s by %s",
            self.node,
            driver.migration_id,
            command.service,
            command.destination,
            command.technique,
        )
        with contextlib.suppress(FogmigError):
            await self.bus.publish(topics.events(self.node), accept(self.node, command.command_id))

    async def _deploy_command(self, cmd: DeployCommand | UndeployCommand) -> None:
        """Start or stop a service on this node; acknowledged once it answers (or is gone)."""
        from fogmig.services.deploy import ServiceSpec, deploy, undeploy

        assert self.bus is not None
        if cmd.service in self.migrating:
            raise MigrationError(f"{cmd.service} is migrating", phase="pending", migration_id="-")
        if isinstance(cmd, DeployCommand):
            spec = ServiceSpec(
                name=cmd.service, state_mb=int(cmd.state_mb), dirty_kbps=cmd.dirty_kbps
            )
            await deploy(spec, node=self.node)
        else:
            # Only this node's copy: a node acts on its own services, never on another's.
            await undeploy(cmd.service, node=self.node)
        await self.bus.publish(topics.events(self.node), accept(self.node, cmd.command_id))
        await self._publish_status()

    async def _check_migrate(self, cmd: MigrateCommand) -> None:
        if cmd.destination == self.node:
            raise ConfigError(f"{cmd.service} already runs on {self.node}")
        if cmd.destination not in self.config.peers:
            raise UnknownNodeError(f"{self.node} has no data link to node {cmd.destination!r}")
        if cmd.service in self.migrating:
            raise MigrationError(
                f"{cmd.service} is already migrating", phase="pending", migration_id="-"
            )
        if self.stopping:
            raise MigrationError(f"{self.node} is stopping", phase="pending", migration_id="-")
        if self.destination.arriving(cmd.service):
            raise MigrationError(
                f"{cmd.service} is still arriving at {self.node} (not committed)",
                phase="pending",
                migration_id="-",
            )
        if not await self.runtime.exists(cmd.service):
            raise MigrationError(
                f"{cmd.service} does not run on {self.node}", phase="pending", migration_id="-"
            )
        if cmd.technique.lazy and not criu_capabilities().postcopy:
            raise ConfigError(f"{self.node} cannot do {cmd.technique}: no userfaultfd")

    async def _begin(self, cmd: MigrateCommand) -> SourceDriver:
        """Everything a migration needs, then ``Begin`` in the journal: from here it is
        accepted and ends with exactly one MigrationDone. Raises (nothing begun) otherwise."""
        assert self.bus is not None
        bus = self.bus
        last = 0.0
        mid = new_migration_id(cmd.service)

        def progress(phase: Phase, done: int, total: int, rate: float) -> None:
            nonlocal last
            now = time.monotonic()
            if done and now - last < 0.5:
                return  # at most two progress events a second
            last = now
            try:
                # A rate over a first instant can exceed what the bus carries: cap it.
                event = MigrationProgress(
                    node=self.node,
                    command_id=cmd.command_id,
                    migration_id=mid,
                    service=cmd.service,
                    phase=phase,
                    bytes_done=min(max(done, 0), MAX_BYTES),
                    bytes_total=min(max(total, 0), MAX_BYTES),
                    rate_bytes_per_s=min(rate, MAX_RATE) if math.isfinite(rate) else 0.0,
                    at=time.time(),
                )
            except ValueError as exc:
                # A progress report is for the eyes only: it never fails the migration.
                log.debug("agent %s: progress not reported: %s", self.node, exc)
                return
            task = asyncio.ensure_future(bus.publish(topics.events(self.node), event))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        state = await self.runtime.state(cmd.service)
        _, dirty_kbps, _ = service_params(state.bundle)
        hooks = self.hook_calls
        return await begin_migration(
            self.source_node,
            service=cmd.service,
            destination=cmd.destination,
            technique=cmd.technique,
            epoch=self.epoch_for(cmd.service),
            rules=cmd.precopy,
            compression=cmd.compression,
            on_progress=progress,
            migration_id=mid,
            command_id=cmd.command_id,
            record_extra={
                "state_bytes": rss(state.pid),
                "dirty_rate_bytes_per_s": dirty_kbps * 1024,
                **self._link_conditions(cmd.destination),
            },
            freezing=hooks.freezing(cmd.service, cmd.destination, mid),
            resumed=hooks.resumed_here(cmd.service, mid),
        )
