"""The testbed's description, shared by everything that runs on it (deploy, agents, demo).

``testbed up`` writes ``run_dir()/testbed/state.json``; :func:`load_state` reads it back as a
typed :class:`TestbedState`. Updates at run time (a link cut, a broker restart) go through
:func:`update_state`, which serialises writers with a lock file.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogmig.platform.base import paths
from fogmig.platform.base.errors import TestbedError, UnknownNodeError
from fogmig.platform.testbed.profiles import LinkProfile

STATE_VERSION = 1


def testbed_run_dir() -> Path:
    """Volatile files of the testbed: state, emulator socket and config, broker files, logs."""
    return paths.run_dir() / "testbed"


def testbed_state_dir() -> Path:
    """Persistent files of the testbed (its site CA and certificates)."""
    return paths.state_dir() / "testbed"


def state_path() -> Path:
    return testbed_run_dir() / "state.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeInfo(_Model):
    """A host of the testbed: a fog node (gateway) or the device host."""

    name: str
    netns: str
    mgmt_ip: str
    data_ip: str


class LinkInfo(_Model):
    """An emulated data link between two hosts, with its current shape."""

    a: str
    b: str
    rate_mbit: float
    rtt_ms: float
    devices: dict[str, str]
    """Interface name of the link at each end, keyed by host name."""
    up: bool = True

    def joins(self, x: str, y: str) -> bool:
        return {self.a, self.b} == {x, y}

    def peer_of(self, host: str) -> str:
        if host == self.a:
            return self.b
        if host == self.b:
            return self.a
        raise UnknownNodeError(f"{host} is not an end of link {self.a}-{self.b}")

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"


class BrokerInfo(_Model):
    netns: str
    ip: str
    port: int
    pid: int | None = None
    config_path: str
    log_path: str


class LinkdInfo(_Model):
    """Who emulates the data links: the userspace emulator (``tun``) or the kernel (``netem``)."""

    backend: Literal["tun", "netem"]
    pid: int | None = None
    socket_path: str | None = None
    config_path: str | None = None
    log_path: str | None = None
    overhead_ms: float | None = None
    """The emulator's own round-trip delay, measured at ``up`` and taken off every link."""


class TestbedState(_Model):
    """Everything a component needs to find its way around the testbed."""

    __test__ = False  # not a pytest test class despite the name

    version: int = STATE_VERSION
    profile: LinkProfile
    bridge: str
    bridge_ip: str
    nodes: list[NodeInfo]
    device_host: NodeInfo
    broker: BrokerInfo
    links: list[LinkInfo]
    linkd: LinkdInfo
    created_at: float = 0.0
    devices: dict[str, str] = Field(default_factory=dict)
    """The devices the site issued a certificate, each with the one service it may speak
    for (``fogmig.platform.testbed.devices``)."""

    @property
    def hosts(self) -> list[NodeInfo]:
        """Fog nodes and the device host: every namespace with data links."""
        return [*self.nodes, self.device_host]

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> NodeInfo:
        """A fog node or the device host by name."""
        for n in self.hosts:
            if n.name == name:
                return n
        raise UnknownNodeError(
            f"no node {name!r} on the testbed (it has {', '.join(h.name for h in self.hosts)})"
        )

    def link(self, a: str, b: str) -> LinkInfo:
        self.node(a)
        self.node(b)
        for link in self.links:
            if link.joins(a, b):
                return link
        raise UnknownNodeError(f"no data link between {a} and {b}")

    def links_of(self, host: str) -> list[LinkInfo]:
        return [link for link in self.links if host in (link.a, link.b)]


def load_state() -> TestbedState:
    """The running testbed's description; TestbedError when it is not up."""
    path = state_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TestbedError("the testbed is not up", hint="fogmig testbed up") from None
    try:
        return TestbedState.model_validate_json(text)
    except ValidationError as exc:
        raise TestbedError(
            f"the testbed state file {path} is unreadable: {exc.error_count()} problem(s)",
            hint="fogmig testbed down, then fogmig testbed up",
        ) from exc


def save_state(state: TestbedState) -> None:
    """Write the state atomically (readers never see half a file)."""
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(state.model_dump_json(indent=2) + "\n")
    tmp.replace(path)


@contextmanager
def state_lock() -> Iterator[None]:
    """Serialise read-modify-write of the state file across processes."""
    lock = testbed_run_dir() / "state.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_state(change: Callable[[TestbedState], None]) -> TestbedState:
    """Load, apply ``change`` in place, save; under the state lock."""
    with state_lock():
        state = load_state()
        change(state)
        save_state(state)
        return state


def remove_state() -> None:
    for name in ("state.json", "state.lock"):
        (testbed_run_dir() / name).unlink(missing_ok=True)


@contextmanager
def exclusive_use(timeout: float = 300.0, poll: float = 0.5) -> Iterator[None]:
    """Hold the testbed for the block: other holders (test sessions that bring the testbed up
    and down) wait here until it is released, rather than tearing each other's testbed down.

    It is advisory: only code that takes it is kept out. Raises TestbedError after ``timeout``.
    """
    lease = paths.run_dir() / "testbed.lease"
    lease.parent.mkdir(parents=True, exist_ok=True)
    with lease.open("a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TestbedError(
                        f"the testbed is held by another user for more than {timeout:g} s "
                        f"(lock {lease})"
                    ) from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
