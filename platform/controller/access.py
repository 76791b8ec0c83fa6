"""The testbed's broker as the controller principal: a bus client with its credentials.

The controller, ``fogmig drain`` and the demo speak to the agents as the testbed's
``controller`` principal (the broker's ACL lets it command every node).
"""

from __future__ import annotations

import uuid

from fogmig.platform.bus.client import Bus


def open_testbed_bus(client: str) -> Bus:
    """A bus client with the controller's credentials on the testbed's broker."""
    from fogmig.platform.testbed.broker import CONTROLLER_USER
    from fogmig.platform.testbed.credentials import load_credentials
    from fogmig.platform.testbed.state import load_state

    state = load_state()
    return Bus(
        host=state.broker.ip,
        port=state.broker.port,
        username=CONTROLLER_USER,
        password=load_credentials().password(CONTROLLER_USER),
        client_id=f"{client}-{uuid.uuid4().hex[:8]}",
        known_nodes=state.node_names,
    )
