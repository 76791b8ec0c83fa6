"""An agent's loops survive any one message: a command whose acknowledgement cannot reach the
broker, a service whose figures do not fit the bus."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fogmig.platform.agent.admission import Admission
from fogmig.platform.agent.commands import CommandHandling
from fogmig.platform.agent.status import service_params
from fogmig.platform.base.errors import BusError
from fogmig.platform.bus.schemas import BusMessage, DrainCommand, ServiceInfo
from fogmig.platform.bus.subscription import Received
from fogmig.platform.bus.topics import topics


class _Sub:
    def __init__(self, items: list[BusMessage]) -> None:
        self._items = items

    async def __aenter__(self) -> _Sub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[Received]:
        async def gen() -> AsyncIterator[Received]:
            for item in self._items:
                yield Received(topics.cmd("gw1"), item)

        return gen()


class _AwayBus:
    """A bus whose broker stays away: every publish fails as after its timeout."""

    def __init__(self, commands: list[BusMessage]) -> None:
        self.commands = commands
        self.published: list[str] = []

    def subscribe(self, pattern: str) -> _Sub:
        return _Sub(self.commands)

    async def publish(self, topic: str, model: BusMessage, **_: Any) -> None:
        self.published.append(topic)
        raise BusError(f"publish to {topic}: not done within 10 s (broker unreachable)")


def test_the_command_loop_survives_a_broker_away_while_it_acknowledges() -> None:
    agent = object.__new__(CommandHandling)
    agent.node = "gw1"
    agent.admission = Admission()
    bus = _AwayBus([DrainCommand(command_id="c1"), DrainCommand(command_id="c2")])
    agent.bus = bus  # type: ignore[assignment]
    asyncio.run(agent._command_loop(asyncio.Event()))
    # Both commands were taken (each tried its acknowledgement), the loop ended normally.
    assert bus.published.count(topics.events("gw1")) >= 2


def _bundle(tmp_path: Path, *args: str) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["sensor", *args]}}))
    return tmp_path


@pytest.mark.parametrize("dirty", ["1e308", "inf", "nan", "-5"])
def test_a_service_whose_dirty_rate_overflows_still_gets_a_status(
    tmp_path: Path, dirty: str
) -> None:
    state_mb, dirty_kbps, port = service_params(_bundle(tmp_path, "--dirty-kbps", dirty))
    info = ServiceInfo(
        name="s1",
        state_bytes=state_mb << 20,
        dirty_rate_bytes_per_s=dirty_kbps * 1024,
        data_ip="10.79.0.1",
        port=port,
    )
    assert info.dirty_rate_bytes_per_s == 0.0


def test_figures_within_the_bounds_are_kept(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "--state-mb", "64", "--dirty-kbps", "250", "--port", "5700")
    assert service_params(bundle) == (64, 250.0, 5700)
