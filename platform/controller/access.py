"""The testbed's broker as the controller principal: a bus client with its certificate.

The controller, ``fogmig drain``, ``fogmig migrate`` and the demo speak to the agents as the
testbed's ``controller`` principal (the broker's ACL lets it command every node).
"""

from __future__ import annotations

import uuid

from fogmig.platform.bus.client import Bus


def open_testbed_bus(client: str) -> Bus:
    """A bus client with the controller's certificate on the testbed's broker."""
    from fogmig.platform.security.identity import Identity
    from fogmig.platform.testbed.mqtt import bus_access

    access = bus_access(Identity.controller())
    return Bus(
        host=access.host,
        port=access.port,
        tls=access.tls,
        client_id=access.client_id(f"{client}-{uuid.uuid4().hex[:8]}"),
        known_nodes=access.known_nodes,
    )
