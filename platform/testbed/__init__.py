"""The embedded testbed: the whole fog on one machine (namespaces, emulated links, broker).

What other components use: :func:`load_state` (where everything is), :func:`load_credentials`
(MQTT passwords), :func:`load_identity` and :func:`node_identity`
(certificates of the site CA), the link controls and :func:`restart_broker`.
"""

from fogmig.platform.testbed.broker import restart_broker
from fogmig.platform.testbed.credentials import TestbedCredentials, load_credentials
from fogmig.platform.testbed.links import cut_link, restore_link, set_link
from fogmig.platform.testbed.pki import load_identity, node_identity
from fogmig.platform.testbed.state import LinkInfo, NodeInfo, TestbedState, load_state

__all__ = [
    "LinkInfo",
    "NodeInfo",
    "TestbedCredentials",
    "TestbedState",
    "cut_link",
    "load_credentials",
    "load_identity",
    "load_state",
    "node_identity",
    "restart_broker",
    "restore_link",
    "set_link",
]
