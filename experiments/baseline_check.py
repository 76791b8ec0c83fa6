"""The service's view of a baseline migration: same counter and running hash, one home.

Before the move a device posts a few readings and notes the service's counter and hash; after
it the service must answer with the same pair on the node it should run on, accept one more
reading (the device's ledger must agree with the service's record of that device), and run
on exactly that node.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from fogmig.platform.base.errors import ServiceError
from fogmig.platform.testbed.state import TestbedState
from fogmig.services.client import DeviceLedger, SensorClient, ServiceState
from fogmig.services.deploy import find_service

ANSWER_TIMEOUT_S = 20.0
"""How long a freshly restored service may take to answer (pages may still fault in)."""


@dataclass(slots=True)
class DeviceCheck:
    """One device's readings before and after the move, and the verdict."""

    state: TestbedState
    service: str
    port: int
    ledger: DeviceLedger = field(
        default_factory=lambda: DeviceLedger(f"baseline-{secrets.token_hex(3)}")
    )
    before_state: ServiceState | None = None

    def _host(self, node: str) -> str:
        return self.state.node(node).mgmt_ip

    async def _post(self, client: SensorClient, host: str, value: int) -> None:
        payload = self.ledger.next_reading(value=value)
        if not self.ledger.record(await client.post_reading(host, payload)):
            raise ServiceError(f"the service on {host} refused a reading")

    async def before(self, node: str, readings: int) -> ServiceState:
        """Post ``readings`` readings to the service on ``node`` and note its state."""
        async with SensorClient(port=self.port, timeout=2.0) as client:
            host = self._host(node)
            for i in range(readings):
                await self._post(client, host, i)
            self.before_state = await client.get_state(host)
        return self.before_state

    async def after(self, on: str, not_on: str) -> list[str]:
        """What is wrong after the move (empty: nothing): the service should run on ``on``."""
        problems: list[str] = []
        running = [p.node for p in await find_service(self.service) if p.container.running]
        if running != [on]:
            problems.append(f"{self.service} runs on {running or 'no node'}, expected [{on!r}]")
        if not_on in running:
            problems.append(f"{self.service} still runs on {not_on}")
        host = self._host(on)
        async with SensorClient(port=self.port, timeout=2.0) as client:
            now = await self._answer(client, host)
            if now is None:
                return [*problems, f"no answer from {self.service} on {on}"]
            before = self.before_state
            if before is not None and (now.count, now.hash) != (before.count, before.hash):
                problems.append(
                    f"state changed across the move: count {before.count} -> {now.count}, "
                    f"hash {before.hash[:12]} -> {now.hash[:12]}"
                )
            try:
                await self._post(client, host, -1)
                check = self.ledger.verify(await client.get_state(host))
            except ServiceError as exc:
                return [*problems, str(exc)]
            if not check.matches:
                problems.append(
                    f"device ledger {check.expected_count}/{check.expected_hash[:12]} "
                    f"!= service {check.service_count}/{check.service_hash[:12]}"
                )
        return problems

    async def _answer(self, client: SensorClient, host: str) -> ServiceState | None:
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return await client.get_state(host)
            except ServiceError:
                await asyncio.sleep(0.2)
        return None
