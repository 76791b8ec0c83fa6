"""Measuring the data link to every peer: RTT by ping, throughput by a timed transfer.

The measurements go into the node's status (the controller's cost model prefers them to the
profile's figures) and into each outgoing migration's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from fogmig.platform.agent.state import AgentState
from fogmig.platform.base import paths
from fogmig.platform.base.errors import FogmigError
from fogmig.platform.bus.schemas import MAX_RATE, MAX_RTT_S, LinkMeasurement
from fogmig.platform.transfer.client import TransferClient

log = logging.getLogger(__name__)


class LinkProbing(AgentState):
    """The agent's link measurements to its peers."""

    async def _links_loop(self, stop: asyncio.Event) -> None:
        """Measure the data link to every peer: RTT by ping, throughput by a timed transfer.

        Skipped while a migration runs here: it would compete with it for the link.
        """
        if self.config.link_probe_interval_s <= 0:
            return  # measurement off (benchmarks: it would share the link)
        while not stop.is_set():
            for peer in sorted(self.config.peers):
                if self.migrating or self.destination.arrivals:
                    break
                try:
                    self.links[peer] = await self._measure_link(peer)
                except (FogmigError, OSError) as exc:
                    log.warning("agent %s: link to %s not measured: %s", self.node, peer, exc)
                except Exception:
                    # A measurement must never take the agent down with it.
                    log.exception("agent %s: link measurement to %s failed", self.node, peer)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.link_probe_interval_s)

    async def _measure_link(self, peer: str) -> LinkMeasurement:
        cfg = self.config
        async with TransferClient.connect(
            cfg.peers[peer], cfg.transfer_port, security=self.channel, peer=peer
        ) as client:
            rtt = statistics.median([await client.ping() for _ in range(5)])
            probe_id = f"probe-{self.node}"
            with tempfile.NamedTemporaryFile(dir=paths.node_dir(self.node)) as fh:
                fh.write(os.urandom(cfg.link_probe_bytes))
                fh.flush()
                sent = await client.send_file(probe_id, Path(fh.name), "probe")
            await client.call("drop_probe", {"migration_id": probe_id})
        # A one-shot transfer includes TCP's slow start: a conservative estimate.
        rate = min(sent.bytes / max(sent.seconds - rtt, 1e-6), MAX_RATE)
        return LinkMeasurement(
            peer=peer, rtt_s=min(rtt, MAX_RTT_S), throughput_bytes_per_s=rate, at=time.time()
        )

    def _link_conditions(self, peer: str) -> dict[str, float]:
        """The last measurement of the link to ``peer`` for the record, if there is one."""
        link = self.links.get(peer)
        if link is None:
            return {}
        return {
            "link_rate_bit_per_s": link.throughput_bytes_per_s * 8,
            "link_rtt_s": link.rtt_s,
        }
