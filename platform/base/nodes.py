"""Names of fog nodes and where their per-node resources live on a machine.

A node name is short and safe in file names, interface names and MQTT topics. On the testbed,
node ``gw1`` lives in network namespace ``fm-gw1``; every node has its own runc root, so two
nodes on one machine behave like two machines.
"""

from __future__ import annotations

import re
from pathlib import Path

from fogmig.platform.base import paths
from fogmig.platform.base.errors import ConfigError

NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
SERVICE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
NETNS_PREFIX = "fm-"


def check_node_name(name: str) -> str:
    if not NODE_NAME.fullmatch(name):
        raise ConfigError(
            f"invalid node name {name!r}: use 1-10 lowercase letters and digits, "
            "starting with a letter (e.g. gw1)"
        )
    return name


def check_service_name(name: str) -> str:
    if not SERVICE_NAME.fullmatch(name):
        raise ConfigError(
            f"invalid service name {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter, at most 31 characters"
        )
    return name


def netns_name(node: str) -> str:
    return NETNS_PREFIX + check_node_name(node)


def runc_root(node: str) -> Path:
    """runc's state directory for this node's containers."""
    return paths.run_dir() / "nodes" / check_node_name(node) / "runc"
