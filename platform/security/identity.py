"""Who a principal of the platform is: a kind (node, device, controller, operator, broker) and
a name.

Certificates carry the identity as a URI subject alternative name (``fogmig:node:gw1``,
``fogmig:device:d1``, ``fogmig:controller``, ``fogmig:operator``, ``fogmig:broker``) and its
principal name as the common name (``gw1``, ``d1``, ``controller``, ``operator``, ``broker``),
which is also the MQTT user name and, the broker binding them, the MQTT client id: one live
connection per principal. The controller daemon and the command line (the operator) are two
principals so that they can be connected at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fogmig.platform.base.errors import IdentityError
from fogmig.platform.base.nodes import NODE_NAME

PrincipalKind = Literal["node", "device", "controller", "operator", "broker"]
KINDS: tuple[PrincipalKind, ...] = get_args(PrincipalKind)
NAMED_KINDS: frozenset[PrincipalKind] = frozenset({"node", "device"})
"""Kinds with many principals, each with its own name; the others exist once per site."""
URI_SCHEME = "fogmig"


@dataclass(frozen=True, kw_only=True)
class Identity:
    """A principal: ``node``/``device`` with a name, or the site's one ``controller``,
    ``operator`` or ``broker``."""

    kind: PrincipalKind
    name: str | None = None
    """The node's or device's name (the node-name rule); None for the site's single principals."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise IdentityError(f"unknown principal kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind in NAMED_KINDS:
            if self.name is None or not NODE_NAME.fullmatch(self.name):
                raise IdentityError(
                    f"invalid {self.kind} name {self.name!r}: use 1-10 lowercase letters and "
                    "digits, starting with a letter (e.g. gw1)"
                )
            # A node named "controller" would share the controller's common name (and MQTT user).
            # Node and device names share that space too: the site issues no device a node's
            # name (fogmig.platform.testbed.devices).
            if self.name in KINDS:
                raise IdentityError(f"{self.kind} name {self.name!r} is reserved")
        elif self.name is not None:
            raise IdentityError(f"the {self.kind} has no name (got {self.name!r})")

    @classmethod
    def node(cls, name: str) -> Identity:
        return cls(kind="node", name=name)

    @classmethod
    def device(cls, name: str) -> Identity:
        return cls(kind="device", name=name)

    @classmethod
    def controller(cls) -> Identity:
        return cls(kind="controller")

    @classmethod
    def operator(cls) -> Identity:
        """The command line's principal (``fogmig migrate``, ``fogmig drain``)."""
        return cls(kind="operator")

    @classmethod
    def broker(cls) -> Identity:
        return cls(kind="broker")

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """The identity that ``uri`` (``fogmig:<kind>[:<name>]``) names."""
        parts = uri.split(":")
        if len(parts) not in (2, 3) or parts[0] != URI_SCHEME:
            raise IdentityError(
                f"not a fogmig identity: {uri!r} (expected e.g. fogmig:node:gw1 or "
                "fogmig:controller)"
            )
        kind = parts[1]
        if kind not in KINDS:
            raise IdentityError(f"unknown principal kind {kind!r} in {uri!r}")
        if len(parts) == 2 and kind in NAMED_KINDS:
            raise IdentityError(f"{uri!r} lacks the {kind}'s name (e.g. fogmig:{kind}:gw1)")
        return cls(kind=kind, name=parts[2] if len(parts) == 3 else None)

    @property
    def uri(self) -> str:
        return ":".join([URI_SCHEME, self.kind, *([self.name] if self.name else [])])

    @property
    def principal(self) -> str:
        """The common name: the node's or device's name, else the kind."""
        return self.name or self.kind

    @property
    def file_stem(self) -> str:
        """A file name for this identity's certificate and key (``node-gw1``, ``controller``)."""
        return f"{self.kind}-{self.name}" if self.name else self.kind

    def __str__(self) -> str:
        return self.uri
