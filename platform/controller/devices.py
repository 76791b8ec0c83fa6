"""Which attachments the controller believes: a device speaks only for itself and its service.

The broker lets a device publish only on its own attachment topic (the ACL's pattern names its
certificate's common name) and the bus refuses a payload naming another device than its topic;
this check repeats that, refuses a device with a node's name (a node may write that topic too)
and holds each device to the one service its site bound it to (a :data:`DeviceDirectory`: the
testbed records the service when it issues the device's certificate), so that no device can
make the controller move a service it does not use.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from fogmig.platform.bus.schemas import DeviceAttach

DeviceDirectory = Callable[[str], str | None]
"""The service a device may speak for, or None for a device the site does not know."""


def attach_refusal(
    topic_device: str | None,
    msg: DeviceAttach,
    directory: DeviceDirectory,
    *,
    nodes: Collection[str] = (),
) -> str | None:
    """Why the controller must not take ``msg`` (received on the attachment topic of
    ``topic_device``), or None when the device speaks for itself and its own service."""
    if topic_device != msg.device:
        return f"attach of {msg.device} arrived on the topic of device {topic_device}"
    if msg.device in nodes:
        return f"attach of {msg.device} refused: that is a node's name, not a device's"
    bound = directory(msg.device)
    if bound is None:
        return f"attach of {msg.device} refused: the site enrolled no such device"
    if bound != msg.service:
        return f"attach of {msg.device} refused: it uses service {bound}, not {msg.service}"
    return None
