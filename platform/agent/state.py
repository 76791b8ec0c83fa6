"""What every part of a node's agent shares: its configuration, runtime, bus and the
migrations under way.

The agent is built in layers on :class:`AgentState`: link probing (``linkprobe``), the node's
status and presence (``status``), commands and migrations (``commands``) and the daemon itself
(``app``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fogmig.platform.agent.admission import Admission
from fogmig.platform.agent.config import AgentConfig
from fogmig.platform.agent.follow import Follow
from fogmig.platform.agent.forwarding import Forwarder
from fogmig.platform.agent.memory import NodeMemory
from fogmig.platform.base import paths
from fogmig.platform.base.nodes import check_node_name, runc_root
from fogmig.platform.bus.client import Bus
from fogmig.platform.bus.schemas import LinkMeasurement
from fogmig.platform.migration.destination import Destination
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.transfer.protection import ChannelSecurity

log = logging.getLogger(__name__)


class AgentState:
    """The state of one node's agent; the layers above add behaviour, :class:`Agent` the daemon."""

    destination: Destination
    """Serves incoming migrations (set by the daemon, which supplies its callbacks)."""
    follow: Follow
    """Where services run, forwarding, hand-overs (set by the daemon)."""
    memory: NodeMemory | None = None
    """Where the drain flag and the commands taken are kept across a restart."""

    def __init__(self, config: AgentConfig) -> None:
        check_node_name(config.node)
        self.config = config
        self.node = config.node
        self.channel = ChannelSecurity.from_files(config.identity)
        """The node's TLS contexts for the transfer channel, loaded once."""
        self.runtime = NodeRuntime(node=config.node, netns=None, runc_root=runc_root(config.node))
        self.pages: dict[str, Any] = {}  # migration id -> LocalImagePages offered to a peer
        self.migrating: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self.draining = False
        self.forwarder = Forwarder(node=config.node, data_ip=config.data_ip)
        self.links: dict[str, LinkMeasurement] = {}
        self._published: set[str] = set()  # services whose presence this node announced
        self.status_now = asyncio.Event()
        """Set to report at once (SIGHUP: a service was deployed or removed by hand)."""
        self._cpu_sample: tuple[float, int] | None = None  # (monotonic s, cpuacct ns)
        self.bus: Bus | None = None
        self.admission = Admission(on_taken=self.save_memory)
        """The commands this node took lately: a replayed or stale one is refused."""
        self.memory = NodeMemory(
            node=config.node, path=paths.node_dir(config.node) / "agent-state.json"
        )
        self._load_memory()

    def _load_memory(self) -> None:
        assert self.memory is not None
        saved, error = self.memory.load()
        if error is not None:
            log.error("agent %s: %s (%s)", self.node, error, error.hint)
        if saved is None:
            return
        self.draining = saved.draining
        self.admission.restore(saved.taken, time.time())
        log.info(
            "agent %s: resumed its saved state: %s, %d command id(s) remembered",
            self.node,
            "draining" if saved.draining else "not draining",
            len(self.admission.taken()),
        )

    def save_memory(self) -> None:
        """Write the drain flag and the commands taken (before the command they name runs)."""
        if self.memory is None:
            return
        try:
            self.memory.save(draining=self.draining, taken=self.admission.taken())
        except OSError as exc:
            # The command still runs: refusing it for a full disk would be worse than a
            # replay window lost if the agent also restarts.
            log.error("agent %s: its state was not saved: %s", self.node, exc)
