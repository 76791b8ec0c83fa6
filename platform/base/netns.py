"""Entering a network namespace from Python, for the calling thread only (``setns``).

Sockets and TUN devices opened while a thread is inside a namespace stay in it afterwards,
which is how the link emulator opens its TUN devices, how the link probe and the lazy page
server make sockets inside a node, and how the device simulator's CoAP thread lives in the
device host. ``setns`` moves only the calling thread: code inside :func:`entered_netns` must
run to completion without yielding to an event loop.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fogmig.platform.base.errors import SetupError
from fogmig.platform.base.proc import NETNS_DIR

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> Path:
    """Where ``ip netns`` keeps the named namespace."""
    return NETNS_DIR / netns


def running_in_netns(netns: str) -> bool:
    """This process already runs in the named network namespace (no need to re-enter it)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(netns_path(netns)).st_ino
    except OSError:
        return False


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise SetupError(f"cannot enter network namespace {what}: {os.strerror(err)}")


def _open(netns: str) -> int:
    try:
        return os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SetupError(
            f"network namespace {netns} does not exist", hint="is the testbed up?"
        ) from None


def enter_netns(netns: str) -> None:
    """Move the calling thread into ``netns`` for good (a thread that lives there)."""
    target = _open(netns)
    try:
        _setns(target, netns)
    finally:
        os.close(target)


@contextmanager
def entered_netns(netns: str) -> Iterator[None]:
    """Move the calling thread into ``netns`` for the block, then back where it was."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter_netns(netns)
        try:
            yield
        finally:
            _setns(own, "of this thread")
    finally:
        os.close(own)
