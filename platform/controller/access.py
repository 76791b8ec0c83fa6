"""The testbed's broker as the controller or the operator: a bus client with its certificate.

The controller daemon (and the demo, which runs one in-process) is the ``controller``
principal; the command line (``fogmig migrate``, ``fogmig drain``) is the ``operator``, whose
ACL lets it command nodes and read the bus. The broker binds a client id to its principal, so
each has one connection at a time: the two are distinct so that a command does not disconnect
a running controller.
"""

from __future__ import annotations

from typing import Literal

from fogmig.platform.bus.client import Bus

Role = Literal["controller", "operator"]


def open_testbed_bus(role: Role) -> Bus:
    """A bus client with the certificate of ``role`` on the testbed's broker."""
    from fogmig.platform.security.identity import Identity
    from fogmig.platform.testbed.mqtt import bus_access

    identity = Identity.controller() if role == "controller" else Identity.operator()
    access = bus_access(identity)
    return Bus(
        host=access.host,
        port=access.port,
        tls=access.tls,
        client_id=access.client_id,
        known_nodes=access.known_nodes,
    )
