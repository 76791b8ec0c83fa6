"""The embedded testbed: the whole fog on one machine (namespaces, emulated links, broker).

What other components use: :func:`load_state` (where everything is), :func:`bus_access` (how a
principal reaches the broker, with its certificate), :func:`load_identity` and
:func:`node_identity` (certificates of the site CA), the link controls and
:func:`restart_broker`.
"""

from fogmig.platform.testbed.broker import restart_broker
from fogmig.platform.testbed.links import cut_link, restore_link, set_link
from fogmig.platform.testbed.mqtt import BusAccess, bus_access
from fogmig.platform.testbed.pki import load_identity, node_identity
from fogmig.platform.testbed.state import LinkInfo, NodeInfo, TestbedState, load_state

__all__ = [
    "BusAccess",
    "LinkInfo",
    "NodeInfo",
    "TestbedState",
    "bus_access",
    "cut_link",
    "load_identity",
    "load_state",
    "node_identity",
    "restart_broker",
    "restore_link",
    "set_link",
]
