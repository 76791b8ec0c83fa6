"""Reaching a service that moves: a gateway forwards a service's CoAP traffic to its node.

A device always talks to its current gateway. When the device's service runs on another node,
the gateway DNATs the service's UDP port to that node's data address (and SNATs, so replies come
back through it and the device sees its gateway answer); once the service runs locally, the
rules go. Conntrack entries of a changed port are dropped, since NAT is decided per flow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fogmig.platform.base.errors import RuntimeToolError
from fogmig.platform.base.proc import run

log = logging.getLogger(__name__)

PRE_CHAIN = "FOGMIG-FWD-PRE"
POST_CHAIN = "FOGMIG-FWD-POST"


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """Where a service runs: its node, that node's data address, its UDP port."""

    service: str
    node: str
    data_ip: str
    port: int


def forwarding_rules(own_node: str, own_ip: str, locations: Iterable[Location]) -> list[str]:
    """The ``iptables-restore`` lines of the nat table for this gateway (pure)."""
    lines = ["*nat", f":{PRE_CHAIN} - [0:0]", f":{POST_CHAIN} - [0:0]"]
    for loc in sorted(locations):
        if loc.node == own_node:
            continue
        lines.append(
            f"-A {PRE_CHAIN} -d {own_ip}/32 -p udp -m udp --dport {loc.port} "
            f"-m comment --comment {loc.service} -j DNAT --to-destination {loc.data_ip}:{loc.port}"
        )
        lines.append(
            f"-A {POST_CHAIN} -d {loc.data_ip}/32 -p udp -m udp --dport {loc.port} "
            f"-m comment --comment {loc.service} -j SNAT --to-source {own_ip}"
        )
    lines.append("COMMIT")
    return lines


def changed_ports(old: Mapping[str, Location], new: Mapping[str, Location]) -> set[int]:
    """Ports whose forwarding changed: their existing flows must be NATed afresh."""
    ports = set()
    for name in old.keys() | new.keys():
        if old.get(name) != new.get(name):
            for loc in (old.get(name), new.get(name)):
                if loc is not None:
                    ports.add(loc.port)
    return ports


class Forwarder:
    """Keeps this node's forwarding rules in line with where services run.

    Runs its commands in the current network namespace (the agent's, which is the node's).
    """

    def __init__(self, *, node: str, data_ip: str, netns: str | None = None) -> None:
        self.node = node
        self.data_ip = data_ip
        self.netns = netns
        self.locations: dict[str, Location] = {}
        self._installed = False

    async def install(self) -> None:
        """Enable forwarding and hook the two chains into the nat table (idempotent)."""
        if self.netns is None:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        else:
            await run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=self.netns)
        await self._apply()
        for chain, hook in ((PRE_CHAIN, "PREROUTING"), (POST_CHAIN, "POSTROUTING")):
            rule = ["-t", "nat", hook, "-j", chain]
            probe = await run(
                ["iptables", "-C", *rule[2:], "-t", "nat"], netns=self.netns, check=False
            )
            if probe.returncode != 0:
                await run(["iptables", "-t", "nat", "-A", hook, "-j", chain], netns=self.netns)
        self._installed = True

    async def update(self, locations: Mapping[str, Location]) -> None:
        """Install the rules for ``locations`` (service -> where it runs now)."""
        new = dict(locations)
        ports = changed_ports(self.locations, new)
        self.locations = new
        if not self._installed:
            await self.install()
        else:
            await self._apply()
        for port in sorted(ports):
            await self._forget_flows(port)
        log.info("forwarding on %s: %s", self.node, sorted(self.locations.values()))

    async def _forget_flows(self, port: int) -> None:
        """Drop the conntrack entries of ``port``: the next datagram of each flow is NATed by
        the rules now in place. A flow left with its old decision would keep going where the
        service no longer is (as long as it stays busy), so a failure is logged.

        Both directions: an entry's original direction is that of the first datagram the
        node saw, and a flow whose first datagram here was the service's (a reply that came
        after its entry was dropped at an earlier change) has the port as its original
        *source*. Left in place, such an entry kept delivering a device's requests to the
        node's own port after the service had left: every request refused, for as long as
        the device kept asking (seen as a probe losing its path for a whole migration).
        """
        for side in ("--orig-port-dst", "--orig-port-src"):
            done = await run(
                ["conntrack", "-D", "-p", "udp", side, str(port)],
                netns=self.netns,
                check=False,
            )
            deleted = done.stderr.strip().splitlines()[-1:] or [""]
            # Exit 1 with "0 flow entries have been deleted" just means no flow matched.
            if done.returncode != 0 and "0 flow entries" not in deleted[0]:
                log.warning(
                    "forwarding on %s: the flows of UDP port %d (%s) were not dropped "
                    "(exit %d): %s",
                    self.node,
                    port,
                    side,
                    done.returncode,
                    done.stderr.strip() or done.stdout.strip(),
                )
            else:
                log.info(
                    "forwarding on %s: UDP port %d (%s): %s", self.node, port, side, deleted[0]
                )

    async def remove(self) -> None:
        """Take the rules out (the agent stops)."""
        for chain, hook in ((PRE_CHAIN, "PREROUTING"), (POST_CHAIN, "POSTROUTING")):
            await run(
                ["iptables", "-t", "nat", "-D", hook, "-j", chain], netns=self.netns, check=False
            )
            await run(["iptables", "-t", "nat", "-F", chain], netns=self.netns, check=False)
            await run(["iptables", "-t", "nat", "-X", chain], netns=self.netns, check=False)
        self._installed = False

    async def _apply(self) -> None:
        text = "\n".join(forwarding_rules(self.node, self.data_ip, self.locations.values()))
        try:
            await run(
                ["iptables-restore", "--noflush"],
                netns=self.netns,
                input_bytes=(text + "\n").encode(),
            )
        except RuntimeToolError:
            log.error("forwarding rules rejected by iptables-restore:\n%s", text)
            raise
