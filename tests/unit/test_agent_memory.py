"""What a node's agent keeps across its restart: the drain flag and the commands it took (a
command sent again after the restart is still a replay), and a bad state file set aside."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fogmig.platform.agent.admission import Admission, CommandReplayedError
from fogmig.platform.agent.commands import CommandHandling
from fogmig.platform.agent.memory import NodeMemory
from fogmig.platform.bus.schemas import BusMessage, CommandAck, DrainCommand


class _Bus:
    def __init__(self) -> None:
        self.published: list[BusMessage] = []

    async def publish(self, topic: str, model: BusMessage, **_: Any) -> None:
        self.published.append(model)


def _agent(memory: NodeMemory) -> tuple[CommandHandling, _Bus]:
    """An agent's command layer with its memory, as it is after a (re)start."""
    agent = object.__new__(CommandHandling)
    agent.node = memory.node
    agent.migrating = {}
    agent.draining = False
    agent.memory = memory
    agent.admission = Admission(on_taken=agent.save_memory)
    saved, error = memory.load()
    assert error is None
    if saved is not None:
        agent.draining = saved.draining
        agent.admission.restore(saved.taken, saved.saved_at)
    bus = _Bus()
    agent.bus = bus  # type: ignore[assignment]

    async def no_status() -> None:
        return None

    agent._publish_status = no_status  # type: ignore[method-assign]
    return agent, bus


def test_the_drain_flag_and_the_commands_taken_outlive_a_restart(tmp_path: Path) -> None:
    memory = NodeMemory(node="gw1", path=tmp_path / "agent-state.json")
    agent, _ = _agent(memory)
    drain = DrainCommand(command_id="d1")
    asyncio.run(agent._on_command(drain))
    assert agent.draining
    again, bus = _agent(memory)  # a new process on the same files
    assert again.draining
    asyncio.run(again._on_command(drain))  # sent again by a controller that restarted
    [ack] = [m for m in bus.published if isinstance(m, CommandAck)]
    assert not ack.accepted
    assert ack.error_type == CommandReplayedError.__name__


def test_ids_outside_the_window_are_not_kept() -> None:
    admission = Admission(max_age_s=10.0, max_skew_s=0.0)
    admission.restore({"old": 100.0, "new": 195.0}, now=200.0)
    assert admission.taken() == {"new": 195.0}
    with pytest.raises(CommandReplayedError):
        admission.admit("new", 195.0, 200.0)


def test_a_corrupt_or_foreign_agent_state_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "agent-state.json"
    path.write_bytes(b"\x00garbage")
    saved, error = NodeMemory(node="gw1", path=path).load()
    assert saved is None
    assert error is not None
    assert error.hint
    assert (tmp_path / "agent-state.json.rejected").exists()
    assert not path.exists()
    NodeMemory(node="gw2", path=path).save(draining=True, taken={})
    saved, error = NodeMemory(node="gw1", path=path).load()
    assert saved is None
    assert error is not None
    assert "gw2" in str(error)
    assert NodeMemory(node="gw1", path=path).load() == (None, None)
