"""Changing the testbed's data links at run time: cut, restore, reshape, set the MTU, inspect.

``await cut_link("gw1", "gw2")`` drops every packet between the two hosts, silently, in both
directions, until ``await restore_link("gw1", "gw2")``; packets in flight are lost. The link
daemon (or tc netem) is told first, then the state file records the new shape.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fogmig.platform.base.errors import ConfigError, TestbedError
from fogmig.platform.testbed import netem, netns
from fogmig.platform.testbed.linkd import ControlRequest, ControlResponse, LinkRuntime
from fogmig.platform.testbed.state import LinkInfo, TestbedState, load_state, update_state

CONTROL_TIMEOUT = 5.0


async def linkd_request(socket_path: str | Path, request: ControlRequest) -> ControlResponse:
    """One request to the link daemon over its unix socket."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket_path)), CONTROL_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        raise TestbedError(
            f"the link emulator does not answer on {socket_path}: {exc}",
            hint="fogmig testbed status; if it died, fogmig testbed down && fogmig testbed up",
        ) from exc
    try:
        writer.write(request.model_dump_json(exclude_none=True).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), CONTROL_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise TestbedError(f"the link emulator did not answer a {request.op}: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line:
        raise TestbedError(f"the link emulator closed the connection on a {request.op}")
    resp = ControlResponse.model_validate_json(line)
    if not resp.ok:
        raise TestbedError(f"the link emulator refused {request.op}: {resp.error}")
    return resp


async def _change(
    a: str,
    b: str,
    *,
    up: bool | None = None,
    rate_mbit: float | None = None,
    rtt_ms: float | None = None,
) -> LinkInfo:
    state = load_state()
    link = state.link(a, b)
    if rate_mbit is not None and rate_mbit <= 0:
        raise ConfigError(f"a link rate must be positive, not {rate_mbit}")
    if rtt_ms is not None and rtt_ms < 0:
        raise ConfigError(f"a round-trip time cannot be negative ({rtt_ms})")
    if up is not None:
        link.up = up
    if rate_mbit is not None:
        link.rate_mbit = rate_mbit
    if rtt_ms is not None:
        link.rtt_ms = rtt_ms
    if state.linkd.backend == "tun":
        assert state.linkd.socket_path is not None
        if up is None:
            request = ControlRequest(op="set", a=a, b=b, rate_mbit=rate_mbit, rtt_ms=rtt_ms)
        else:
            request = ControlRequest(op="restore" if up else "cut", a=a, b=b)
        await linkd_request(state.linkd.socket_path, request)
    else:
        await netem.apply_link(state, link)

    def record(s: TestbedState) -> None:
        stored = s.link(a, b)
        stored.up, stored.rate_mbit, stored.rtt_ms = link.up, link.rate_mbit, link.rtt_ms

    update_state(record)
    return link


async def cut_link(a: str, b: str) -> None:
    """Drop all traffic between hosts ``a`` and ``b`` (both ways) until restored."""
    await _change(a, b, up=False)


async def restore_link(a: str, b: str) -> None:
    """Let traffic between ``a`` and ``b`` through again, with the link's current shape."""
    await _change(a, b, up=True)


async def set_link(
    a: str, b: str, *, rate_mbit: float | None = None, rtt_ms: float | None = None
) -> None:
    """Change the rate and/or round-trip time of the link between ``a`` and ``b``."""
    await _change(a, b, rate_mbit=rate_mbit, rtt_ms=rtt_ms)


async def set_data_mtu(mtu: int, state: TestbedState | None = None) -> None:
    """Give every data link's interfaces (in every host) this MTU; connections opened later
    use it. ``topology.DATA_MTU`` restores the testbed's own."""
    if not 576 <= mtu <= 65535:
        raise ConfigError(f"MTU {mtu} is not usable on an IPv4 link (576..65535)")
    state = state or load_state()
    for host in state.hosts:
        commands = [
            f"link set {link.devices[host.name]} mtu {mtu}" for link in state.links_of(host.name)
        ]
        if commands:
            await netns.ip_batch(commands, netns=host.netns)


async def link_runtime(state: TestbedState | None = None) -> ControlResponse | None:
    """What the link daemon reports now (counters, CPU), or None for the netem backend."""
    state = state or load_state()
    if state.linkd.backend != "tun" or state.linkd.socket_path is None:
        return None
    return await linkd_request(state.linkd.socket_path, ControlRequest(op="status"))


__all__ = [
    "LinkRuntime",
    "cut_link",
    "link_runtime",
    "linkd_request",
    "restore_link",
    "set_data_mtu",
    "set_link",
]
