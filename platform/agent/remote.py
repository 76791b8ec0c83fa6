"""Asking an agent to migrate one of its services, from outside the platform's controller.

:func:`request_migration` finds the node that runs the service, sends it a migrate command as
the testbed's operator principal and follows the migration's events until it ends.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fogmig.platform.base.errors import MigrationError, ServiceError
from fogmig.platform.base.vocabulary import Technique
from fogmig.platform.migration.record import MigrationRecord


async def request_migration(
    service: str,
    destination: str,
    technique: Technique,
    *,
    compression: bool = True,
    max_rounds: int | None = None,
    on_progress: Any = None,
    timeout: float = 900.0,
) -> MigrationRecord:
    """Ask the node running ``service`` to migrate it; wait for the end and return its record."""
    from fogmig.platform.bus.schemas import MigrateCommand, MigrationDone, MigrationProgress
    from fogmig.platform.bus.topics import topics
    from fogmig.platform.controller.access import open_testbed_bus
    from fogmig.policies.conditions import PrecopyStopRules
    from fogmig.services.deploy import find_service

    placements = await find_service(service)
    running = [p for p in placements if p.container.running]
    if not running:
        raise ServiceError(
            f"service {service} runs on no node", hint="`fogmig services` lists what runs where"
        )
    source = running[0].node
    rules = PrecopyStopRules() if max_rounds is None else PrecopyStopRules(max_rounds=max_rounds)
    command = MigrateCommand(
        command_id=uuid.uuid4().hex[:12],
        service=service,
        destination=destination,
        technique=technique,
        compression=compression,
        precopy=rules,
        reason="requested on the command line",
    )
    async with (
        open_testbed_bus("operator") as bus,
        bus.subscribe(topics.events(source)) as events,
    ):
        await bus.request(source, command, timeout=15.0)
        async with asyncio.timeout(timeout):
            async for _, msg in events:
                if getattr(msg, "command_id", None) != command.command_id:
                    continue
                if isinstance(msg, MigrationProgress) and on_progress is not None:
                    on_progress(msg)
                if isinstance(msg, MigrationDone):
                    return msg.record
    raise MigrationError("the bus closed before the migration ended", phase="?", migration_id="?")
