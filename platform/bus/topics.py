"""The bus's topic tree under one versioned prefix: builders, parsing, and the rejections a
topic or payload can meet (pure values, no I/O)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from fogmig.platform.base.errors import FogmigError
from fogmig.platform.base.nodes import NODE_NAME, SERVICE_NAME

PREFIX = "fogmig/v1"
WILDCARD = "+"

# Devices are named by whoever runs them; keep the names safe as one MQTT topic level.
DEVICE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Rejection(StrEnum):
    """Why a payload or topic was rejected (``SchemaError.reason``)."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"  # not JSON, or JSON but not an object
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_KIND = "unknown_kind"
    INVALID = "invalid"  # JSON object that fails the model's validation
    UNKNOWN_TOPIC = "unknown_topic"
    TOPIC_MISMATCH = "topic_mismatch"  # the payload does not belong on that topic
    UNKNOWN_NODE = "unknown_node"


class SchemaError(FogmigError):
    """A topic or payload that breaks the bus contract; ``reason`` says which rule."""

    def __init__(self, reason: Rejection, message: str, *, topic: str | None = None) -> None:
        self.reason = reason
        self.topic = topic
        where = f" on {topic}" if topic is not None else ""
        super().__init__(f"rejected payload{where} ({reason}): {message}")


class TopicKind(StrEnum):
    STATUS = "status"
    CMD = "cmd"
    EVENTS = "events"
    SERVICE = "service"
    ATTACH = "attach"
    DECISIONS = "decisions"


class TopicRef(NamedTuple):
    """A parsed topic: its kind and the names it carries (``None`` where it has none)."""

    kind: TopicKind
    node: str | None = None
    service: str | None = None
    device: str | None = None


def _level(value: str, pattern: str, what: str, *, wildcard: bool, topic: str | None = None) -> str:
    if wildcard and value == WILDCARD:
        return value
    # fullmatch: with re.match a "$" also matches before a trailing newline ("gw1\n").
    if not re.fullmatch(pattern, value):
        raise SchemaError(Rejection.UNKNOWN_TOPIC, f"invalid {what} name {value!r}", topic=topic)
    return value


class Topics:
    """Builders of the topic tree; pass ``"+"`` as a name for a subscription pattern."""

    @staticmethod
    def status(node: str = WILDCARD) -> str:
        return f"{PREFIX}/nodes/{_level(node, NODE_NAME.pattern, 'node', wildcard=True)}/status"

    @staticmethod
    def cmd(node: str = WILDCARD) -> str:
        return f"{PREFIX}/nodes/{_level(node, NODE_NAME.pattern, 'node', wildcard=True)}/cmd"

    @staticmethod
    def events(node: str = WILDCARD) -> str:
        return f"{PREFIX}/nodes/{_level(node, NODE_NAME.pattern, 'node', wildcard=True)}/events"

    @staticmethod
    def service(node: str = WILDCARD, service: str = WILDCARD) -> str:
        n = _level(node, NODE_NAME.pattern, "node", wildcard=True)
        s = _level(service, SERVICE_NAME.pattern, "service", wildcard=True)
        return f"{PREFIX}/nodes/{n}/services/{s}"

    @staticmethod
    def attach(device: str = WILDCARD) -> str:
        d = _level(device, DEVICE_NAME_PATTERN, "device", wildcard=True)
        return f"{PREFIX}/devices/{d}/attach"

    @staticmethod
    def decisions() -> str:
        return f"{PREFIX}/controller/decisions"

    @staticmethod
    def everything() -> str:
        return f"{PREFIX}/#"


topics = Topics


def parse_topic(topic: str) -> TopicRef:
    """Split a concrete topic of the tree into its kind and names; reject anything else."""
    parts = topic.split("/")
    if parts[:2] != PREFIX.split("/"):
        raise SchemaError(Rejection.UNKNOWN_TOPIC, f"not under {PREFIX}/", topic=topic)

    def name(value: str, pattern: str, what: str) -> str:
        return _level(value, pattern, what, wildcard=False, topic=topic)

    match parts[2:]:
        case ["nodes", node, "status"]:
            return TopicRef(TopicKind.STATUS, node=name(node, NODE_NAME.pattern, "node"))
        case ["nodes", node, "cmd"]:
            return TopicRef(TopicKind.CMD, node=name(node, NODE_NAME.pattern, "node"))
        case ["nodes", node, "events"]:
            return TopicRef(TopicKind.EVENTS, node=name(node, NODE_NAME.pattern, "node"))
        case ["nodes", node, "services", service]:
            return TopicRef(
                TopicKind.SERVICE,
                node=name(node, NODE_NAME.pattern, "node"),
                service=name(service, SERVICE_NAME.pattern, "service"),
            )
        case ["devices", device, "attach"]:
            return TopicRef(TopicKind.ATTACH, device=name(device, DEVICE_NAME_PATTERN, "device"))
        case ["controller", "decisions"]:
            return TopicRef(TopicKind.DECISIONS)
    raise SchemaError(Rejection.UNKNOWN_TOPIC, "no such topic in the tree", topic=topic)
