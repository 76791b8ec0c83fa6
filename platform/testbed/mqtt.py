"""How a principal of the testbed reaches its broker: address, port and TLS context.

Every client of the testbed's bus (agents, the controller, the operator's command line, each
device) proves who it is with its certificate from the testbed's site CA; the broker takes the
certificate's common name as the user name its ACL is written for, and as the client id: a
second connection of one principal makes the broker close the first.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from fogmig.platform.security.identity import Identity
from fogmig.platform.security.tls import broker_client_context
from fogmig.platform.testbed.pki import load_identity
from fogmig.platform.testbed.state import TestbedState, load_state


@dataclass(frozen=True, kw_only=True)
class BusAccess:
    """What a bus client of one principal needs (``Bus(host=..., client_id=access.client_id,
    ...)``)."""

    host: str
    port: int
    tls: ssl.SSLContext
    known_nodes: tuple[str, ...]
    principal: str
    """The certificate's common name: the broker's user name for this client."""

    @property
    def client_id(self) -> str:
        """The client id the broker gives this principal whatever it asks for (its user name):
        asking for it keeps the client's own log in line with the broker's."""
        return self.principal


def bus_access(identity: Identity, state: TestbedState | None = None) -> BusAccess:
    """How ``identity`` reaches the testbed's broker."""
    state = state or load_state()
    return BusAccess(
        host=state.broker.ip,
        port=state.broker.port,
        tls=broker_client_context(load_identity(identity)),
        known_nodes=tuple(state.node_names),
        principal=identity.principal,
    )


def mosquitto_client_args(identity: Identity, state: TestbedState | None = None) -> list[str]:
    """The options of ``mosquitto_pub``/``mosquitto_sub`` to reach the broker as ``identity``."""
    state = state or load_state()
    files = load_identity(identity)
    return [
        *("-h", state.broker.ip, "-p", str(state.broker.port)),
        *("--cafile", str(files.ca), "--cert", str(files.cert), "--key", str(files.key)),
    ]
