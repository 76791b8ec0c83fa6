"""A migration watched by a probe device: the downtime the devices see, beside the node's.

A probe (:mod:`fogmig.device_sim.probe`) in the device host's namespace asks the migrating
service through a gateway before, during and after the migration; the record gets what the
probe saw between its start and finish (``device_downtime_s`` and the probe's counts). The
gateway is one that neither runs the service before nor after (if the testbed has one) or the
source, so the probe's traffic is forwarded once the service has left (or the source itself, if
the third gateway does not forward the service yet).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from fogmig.device_sim.observed import ProbeTimeline, WindowObservation
from fogmig.device_sim.probe import Probe, ProbeSettings, write_csv
from fogmig.platform.agent.remote import request_migration
from fogmig.platform.base.errors import ServiceError
from fogmig.platform.base.vocabulary import Technique
from fogmig.platform.migration.record import MigrationRecord
from fogmig.platform.testbed.state import TestbedState, load_state
from fogmig.services.deploy import find_service

LEAD_TIMEOUT_S: Final = 6.0
"""How long to wait for the probe's first answer before asking for the migration: a third
gateway forwards a freshly deployed service once its node has said where it runs (at its next
status report, every 5 s by default); without an answer the probe asks the source itself."""
TAIL_TIMEOUT_S: Final = 5.0
"""How long after the migration to wait for an answer that closes the window."""
POLL_S: Final = 0.05


def probe_gateway(nodes: Sequence[str], source: str, destination: str) -> str:
    """The gateway the probe asks: the first that is neither end of the move, else the source."""
    others = [n for n in nodes if n not in (source, destination)]
    return others[0] if others else source


def observe(record: MigrationRecord, timeline: ProbeTimeline) -> WindowObservation | None:
    """Fill ``record``'s device-observed figures from the probe's run over its start..finish
    (wall times); None (and the record untouched) when the record has no times."""
    if record.started_at <= 0 or record.finished_at < record.started_at:
        return None
    seen = timeline.window_wall(record.started_at, record.finished_at)
    record.device_downtime_s = None if seen.downtime_s is None else round(seen.downtime_s, 6)
    record.probe_rate_hz = round(1.0 / timeline.interval_s, 6)
    record.probe_sent = seen.sent
    record.probe_answered = seen.answered
    record.probe_lost = seen.lost
    return seen


def _answered_after(probe: Probe, at: float) -> bool:
    return any(r.answered_at is not None and r.answered_at >= at for r in probe.records())


async def _wait_answer(probe: Probe, after: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _answered_after(probe, after):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def migrate_probed(
    service: str,
    destination: str,
    technique: Technique,
    *,
    settings: ProbeSettings | None = None,
    csv_path: Path | None = None,
    state: TestbedState | None = None,
    **request: Any,
) -> tuple[MigrationRecord, ProbeTimeline]:
    """Migrate ``service`` (as :func:`request_migration`, whose keywords ``request`` passes
    on) while a probe asks it; the record carries what the probe saw, ``csv_path`` gets the
    probe's requests."""
    state = state or load_state()
    running = [p for p in await find_service(service) if p.container.running]
    port = running[0].port if running else None
    if not running or port is None:
        raise ServiceError(
            f"service {service} runs on no node (or its port is unknown)",
            hint="`fogmig services` lists what runs where",
        )
    source = running[0].node
    gateway = probe_gateway(state.node_names, source, destination)
    async with Probe.running(
        address=state.node(gateway).data_ip,
        port=port,
        settings=settings,
        netns=state.device_host.netns,
    ) as probe:
        # Answers before the window bound it from below; without them the downtime is None.
        if not await _wait_answer(probe, -math.inf, LEAD_TIMEOUT_S) and gateway != source:
            probe.retarget(state.node(source).data_ip)
            await _wait_answer(probe, -math.inf, LEAD_TIMEOUT_S)
        record = await request_migration(service, destination, technique, **request)
        end = record.finished_at - probe.timeline().wall_offset_s
        await _wait_answer(probe, end, TAIL_TIMEOUT_S)
    timeline = probe.timeline()
    observe(record, timeline)
    if csv_path is not None:
        write_csv(timeline, csv_path)
    return record, timeline
