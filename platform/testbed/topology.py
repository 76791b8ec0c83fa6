"""The shape of the testbed, computed without touching the machine.

Names and addresses of every namespace, the management bridge, and the full mesh of data links
(fog node to fog node, device host to every fog node). ``testbed up`` builds what this plans.
"""

from __future__ import annotations

import itertools
from typing import Literal

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.nodes import check_node_name, netns_name
from fogmig.platform.testbed.profiles import LinkProfile
from fogmig.platform.testbed.state import (
    BrokerInfo,
    LinkdInfo,
    LinkInfo,
    NodeInfo,
    TestbedState,
    testbed_run_dir,
)

BRIDGE = "fmbr0"
MGMT_PREFIX = "10.77.0"
MGMT_PREFIXLEN = 24
DATA_PREFIX = "10.79.0"
BRIDGE_IP = f"{MGMT_PREFIX}.1"
BROKER = "broker"
DEVICE_HOST = "dev"
BROKER_PORT = 1883
MGMT_IFNAME = "mgmt0"
# The root-namespace end of a host's management veth, and a data link's device in a host.
MGMT_VETH_PREFIX = "fmv-"
DATA_IF_PREFIX = "fd-"
# Large packets keep the link daemon's packet rate (and CPU) low; not as large as 65000, with
# which a window is only a handful of packets: TCP then cannot fast-retransmit, every loss
# costs a timeout, and BBR overestimates the rate (measured: 11.34 Mbit/s asked, 9.3-9.9 got
# with retransmissions at 65000; 11.29 and none at 16000, linkd 12% of a core at 100 Mbit/s).
DATA_MTU = 16000
MAX_NODES = 16


def gateway_name(index: int) -> str:
    return f"gw{index}"


def mgmt_veth(host: str) -> str:
    return MGMT_VETH_PREFIX + host


def data_ifname(peer: str) -> str:
    """The interface in a host's namespace that leads to ``peer``."""
    return DATA_IF_PREFIX + peer


def plan(
    profile: LinkProfile, n_nodes: int, *, backend: Literal["tun", "netem"] = "tun"
) -> TestbedState:
    """The testbed for ``n_nodes`` fog nodes gw1..gwN on ``profile`` (no process ids yet)."""
    if not 1 <= n_nodes <= MAX_NODES:
        raise ConfigError(f"--nodes must be between 1 and {MAX_NODES}, not {n_nodes}")
    nodes = [
        NodeInfo(
            name=check_node_name(gateway_name(i)),
            netns=netns_name(gateway_name(i)),
            mgmt_ip=f"{MGMT_PREFIX}.{10 + i}",
            data_ip=f"{DATA_PREFIX}.{i}",
        )
        for i in range(1, n_nodes + 1)
    ]
    device_host = NodeInfo(
        name=DEVICE_HOST,
        netns=netns_name(DEVICE_HOST),
        mgmt_ip=f"{MGMT_PREFIX}.10",
        data_ip=f"{DATA_PREFIX}.100",
    )
    pairs = [(a.name, b.name) for a, b in itertools.combinations(nodes, 2)]
    pairs += [(DEVICE_HOST, n.name) for n in nodes]
    links = [
        LinkInfo(
            a=a,
            b=b,
            rate_mbit=profile.rate_mbit,
            rtt_ms=profile.rtt_ms,
            devices={a: data_ifname(b), b: data_ifname(a)},
        )
        for a, b in pairs
    ]
    return TestbedState(
        profile=profile,
        bridge=BRIDGE,
        bridge_ip=BRIDGE_IP,
        nodes=nodes,
        device_host=device_host,
        broker=broker_info(),
        links=links,
        linkd=linkd_info(backend),
    )


def broker_info() -> BrokerInfo:
    """Where the broker listens and keeps its files (the same for every testbed)."""
    run = testbed_run_dir()
    return BrokerInfo(
        netns=netns_name(BROKER),
        ip=f"{MGMT_PREFIX}.2",
        port=BROKER_PORT,
        config_path=str(run / "broker" / "mosquitto.conf"),
        log_path=str(run / "mosquitto.log"),
    )


def linkd_info(backend: Literal["tun", "netem"] = "tun") -> LinkdInfo:
    """The link daemon's files; the kernel backend has no daemon."""
    if backend == "netem":
        return LinkdInfo(backend=backend)
    run = testbed_run_dir()
    return LinkdInfo(
        backend=backend,
        socket_path=str(run / "linkd.sock"),
        config_path=str(run / "linkd.json"),
        log_path=str(run / "linkd.log"),
    )


def same_shape(a: TestbedState, b: TestbedState) -> bool:
    """Whether two testbeds have the same profile and hosts (so one can stand in for the other)."""
    return (
        a.profile == b.profile
        and a.node_names == b.node_names
        and a.linkd.backend == b.linkd.backend
    )
