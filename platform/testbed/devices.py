"""The testbed's devices: a certificate of the site CA each, and the one service each uses.

A process that runs devices (``fogmig device-sim``, the demo) enrolls them first
(:func:`enroll_devices`): the testbed issues every new device its own certificate
(``fogmig:device:<name>``, common name ``<name>``, the broker's user name and client id), so the
broker's ACL lets it publish only its own attachment, and records in the testbed state the
service it speaks for, which the controller reads (:class:`TestbedDevices`). Certificates are
issued once and kept until ``testbed down``; enrolling a device again with another service
rebinds it. A device may not take a node's name: the two share the broker's user names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.base.nodes import check_service_name
from fogmig.platform.bus.client import Bus
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import (
    IdentityFiles,
    identity_files,
    issue,
    load_ca,
    save_identity,
)
from fogmig.platform.testbed.pki import pki_dir
from fogmig.platform.testbed.state import (
    TestbedState,
    load_state,
    save_state,
    state_lock,
    state_path,
)


def enroll_devices(devices: Mapping[str, str]) -> dict[str, IdentityFiles]:
    """Certificates for ``devices`` (name -> its service), issued by the testbed's CA where
    missing, and their services recorded in the testbed state; returns each device's files."""
    identities = {name: Identity.device(name) for name in devices}  # IdentityError: bad name
    for service in devices.values():
        check_service_name(service)
    folder = pki_dir()
    with state_lock():
        state = load_state()
        taken = sorted(set(devices) & {*state.node_names})
        if taken:
            raise ConfigError(
                f"device name(s) {', '.join(taken)} are node names",
                hint="name devices apart from the nodes (the broker knows both by name)",
            )
        files = {name: identity_files(folder, identity) for name, identity in identities.items()}
        missing = [name for name, f in files.items() if not (f.cert.is_file() and f.key.is_file())]
        if missing:
            ca = load_ca(folder)
            for name in missing:
                save_identity(issue(ca, identities[name]), folder)
        if any(state.devices.get(name) != service for name, service in devices.items()):
            state.devices.update(devices)
            save_state(state)
    return files


class TestbedDevices:
    """The controller's view of the enrolled devices: ``directory(device)`` is the service the
    device may speak for, or None for a device the site does not know.

    The state file is read again when it changed since the last read (a device host enrolled
    devices while the controller runs; it is replaced, never written in place), checked by its
    inode, modification time and size.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self) -> None:
        self._seen: tuple[int, int, int] | None = None
        self._devices: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            st = os.stat(state_path())
        except FileNotFoundError:
            self._seen, self._devices = None, {}
            return
        mark = (st.st_ino, st.st_mtime_ns, st.st_size)
        if mark != self._seen:
            state: TestbedState = load_state()
            self._seen, self._devices = mark, dict(state.devices)

    def __call__(self, device: str) -> str | None:
        self._refresh()
        return self._devices.get(device)


@contextlib.asynccontextmanager
async def device_buses(
    devices: Mapping[str, str], state: TestbedState | None = None
) -> AsyncIterator[dict[str, Bus]]:
    """One bus connection per device of ``devices`` (name -> service), each with the device's
    own certificate (enrolled first), opened together and closed on exit."""
    from fogmig.platform.testbed.mqtt import bus_access

    enroll_devices(devices)
    state = state or load_state()
    buses: dict[str, Bus] = {}
    for name in devices:
        access = bus_access(Identity.device(name), state)
        buses[name] = Bus(
            host=access.host,
            port=access.port,
            tls=access.tls,
            client_id=access.client_id,
            known_nodes=access.known_nodes,
        )
    async with contextlib.AsyncExitStack() as stack:
        # Side by side (a TLS handshake each); a failure cancels the rest before the stack
        # closes the ones already open.
        async with asyncio.TaskGroup() as tg:
            for bus in buses.values():
                tg.create_task(stack.enter_async_context(bus))
        yield buses
