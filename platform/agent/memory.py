"""What a node's agent keeps across its own restart, besides the migration journal.

The drain flag (a restarted agent that forgot it would take services again, and the
controller would move them back) and the ids of the commands it took lately (a command sent
again after a restart of the controller or a broker redelivery must still be refused as a
replay, not run twice). Written atomically at every change, read at start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fogmig.platform.base.durable import read_saved, set_aside, write_atomic
from fogmig.platform.base.errors import StateFileError
from fogmig.platform.bus.schemas import Id, NodeName

log = logging.getLogger(__name__)

FORMAT: Literal["fogmig-agent-state"] = "fogmig-agent-state"


class SavedAgent(BaseModel):
    """The agent's state file (``<state dir>/nodes/<node>/agent-state.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: Literal["fogmig-agent-state"] = FORMAT
    version: Literal[1] = 1
    node: NodeName
    saved_at: float
    draining: bool = False
    taken: dict[Id, float] = Field(default_factory=dict)
    """Command id -> the command's ``at``, for the ids taken within the admission window."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeMemory:
    """Where one node's agent keeps :class:`SavedAgent`."""

    node: str
    path: Path

    def load(self) -> tuple[SavedAgent | None, StateFileError | None]:
        """The saved state, ``(None, None)`` if there is none, or the error of a bad file
        (set aside: the agent starts without it)."""
        saved, error = read_saved(
            self.path,
            SavedAgent.model_validate_json,
            what=f"the saved state of {self.node}'s agent",
            hint="the agent starts as if new: it is not draining and takes any fresh command; "
            "send the drain command again if the node was draining",
        )
        if saved is not None and saved.node != self.node:
            kept = set_aside(self.path)
            return None, StateFileError(
                f"{self.path} is the saved state of node {saved.node}, not of {self.node}; "
                f"kept as {kept}; starting without it",
                kept=kept,
                hint="is FOGMIG_STATE_DIR shared by two nodes?",
            )
        return saved, error

    def save(self, *, draining: bool, taken: dict[str, float]) -> None:
        state = SavedAgent(node=self.node, saved_at=time.time(), draining=draining, taken=taken)
        write_atomic(self.path, state.model_dump_json().encode())
