"""Data links shaped by the kernel (veth pairs with tc netem), where the kernel has netem.

The commands are built by pure functions so they can be checked without root; ``cut`` keeps
the link's delay and rate and adds 100% loss, which drops packets silently like the
userspace emulator does.
"""

from __future__ import annotations

from fogmig.platform.base.proc import run
from fogmig.platform.testbed.linkemu import queue_bytes_for
from fogmig.platform.testbed.state import LinkInfo, TestbedState

DATA_MTU = 1500


def netem_argv(
    ifname: str, *, rate_mbit: float, rtt_ms: float, cut: bool = False, verb: str = "replace"
) -> list[str]:
    """``tc qdisc <verb>`` of one link end: half the RTT each way, the rate, loss when cut."""
    limit = max(1000, queue_bytes_for(rate_mbit, rtt_ms) // DATA_MTU + 100)
    argv = [
        "tc", "qdisc", verb, "dev", ifname, "root", "netem",
        "delay", f"{rtt_ms / 2:.3f}ms",
        "rate", f"{rate_mbit * 1000:.0f}kbit",
        "limit", str(limit),
    ]  # fmt: skip
    if cut:
        argv += ["loss", "100%"]
    return argv


async def apply_link(state: TestbedState, link: LinkInfo) -> None:
    """Set both ends of ``link`` to its current rate, RTT and cut state."""
    for host, ifname in link.devices.items():
        await run(
            netem_argv(ifname, rate_mbit=link.rate_mbit, rtt_ms=link.rtt_ms, cut=not link.up),
            netns=state.node(host).netns,
            what=f"shape link {link.name} at {host}",
        )
