"""The testbed's site CA and the certificates of its principals.

``testbed up`` makes them once (a reused testbed keeps its own) in ``state_dir()/testbed/pki``
(mode 0700, keys 0600): a fresh CA, a certificate per fog node (with its data address as an IP
SAN), the controller, the operator (the command line) and the broker (with the broker's
address). Devices get theirs on demand (``fogmig.platform.testbed.devices``), one each.
``testbed down`` removes them with the other secrets: each run of the testbed is a site of its
own, so nothing left over from an earlier run (an agent of a crashed run, a copied key) is
trusted by the next one, and making a CA costs milliseconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fogmig.platform.base.errors import TestbedError
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import (
    IdentityFiles,
    create_ca,
    identity_files,
    issue,
    save_ca,
    save_identity,
)
from fogmig.platform.testbed.state import TestbedState, testbed_state_dir


def pki_dir() -> Path:
    return testbed_state_dir() / "pki"


def testbed_identities(state: TestbedState) -> dict[Identity, list[str]]:
    """Every principal of the testbed, with the addresses its certificate carries."""
    found: dict[Identity, list[str]] = {Identity.node(n.name): [n.data_ip] for n in state.nodes}
    found[Identity.controller()] = []
    found[Identity.operator()] = []
    found[Identity.broker()] = [state.broker.ip]
    return found


def create_pki(state: TestbedState) -> list[IdentityFiles]:
    """A new CA and certificates for every principal of ``state``, replacing any earlier ones."""
    remove_pki()
    folder = pki_dir()
    ca = create_ca(name="fogmig testbed CA")
    save_ca(ca, folder)
    return [
        save_identity(issue(ca, identity, ip_addresses=addresses), folder)
        for identity, addresses in testbed_identities(state).items()
    ]


def missing_identities(state: TestbedState) -> list[Identity]:
    """The principals of ``state`` whose certificate or key the testbed does not hold."""
    folder = pki_dir()
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        return []  # only root reads it: nothing to tell
    missing = []
    for identity in testbed_identities(state):
        files = identity_files(folder, identity)
        if not (files.cert.is_file() and files.key.is_file()):
            missing.append(identity)
    return missing


def load_identity(identity: Identity) -> IdentityFiles:
    """Where the testbed keeps ``identity``'s certificate, key and the CA certificate."""
    files = identity_files(pki_dir(), identity)
    missing = [p for p in (files.cert, files.key, files.ca) if not p.is_file()]
    if missing:
        raise TestbedError(
            f"the testbed has no certificate for {identity} ({missing[0]} is missing)",
            hint="fogmig testbed up (a testbed made by an earlier fogmig: fogmig testbed down "
            "first)",
        )
    return files


def node_identity(node: str) -> IdentityFiles:
    """A fog node's certificate, key and the CA certificate."""
    return load_identity(Identity.node(node))


def remove_pki() -> bool:
    """Remove the CA and all certificates; whether there was anything to remove."""
    folder = pki_dir()
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True
