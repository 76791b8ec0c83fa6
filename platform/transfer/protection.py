"""How a node's transfer channel is protected: mutual TLS 1.3 with the node's own certificate.

Both ends present a certificate of the site CA naming them as a node (``fogmig:node:<name>``);
the server takes the peer's name from the client's certificate, the client makes sure the server
is the node it wanted. TLS protects every frame (encryption and record integrity), so data
altered or injected on the link ends the connection instead of reaching a file.

:meth:`ChannelSecurity.plaintext_for_benchmarks` exists only so the transfer benchmark can
measure what TLS costs; nothing in the agent's configuration leads to it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from fogmig.platform.base.errors import ConfigError, SecurityError
from fogmig.platform.base.nodes import check_node_name
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import IdentityFiles
from fogmig.platform.security.tls import client_context, server_context


@dataclass(frozen=True, kw_only=True)
class ChannelSecurity:
    """A node's TLS contexts for serving and for connecting, built once and shared."""

    node: str
    """This node's name: the one its certificate names."""
    server: ssl.SSLContext | None
    """Context of the listening side; None only in the benchmarks' plaintext mode."""
    client: ssl.SSLContext | None
    """Context of the connecting side; None only in the benchmarks' plaintext mode."""
    cert: str = "this node's certificate"
    """Where this node's certificate is, for hints."""
    ca: str = "the site CA's certificate"
    """Where the CA certificate that peers must chain to is, for hints."""

    @classmethod
    def from_files(cls, files: IdentityFiles) -> ChannelSecurity:
        """Load a node's certificate, key and the site CA (SecurityError when unusable)."""
        if files.identity.kind != "node" or files.identity.name is None:
            raise ConfigError(
                f"the transfer channel needs a node's certificate, not {files.identity}",
                hint=f"give the agent the certificate of its node, not {files.cert}",
            )
        try:
            server, client = server_context(files), client_context(files)
        except SecurityError as exc:
            raise SecurityError(
                str(exc),
                hint=f"check {files.cert}, {files.key} and {files.ca} (PEM, readable by the agent)",
            ) from exc
        return cls(
            node=files.identity.name,
            server=server,
            client=client,
            cert=str(files.cert),
            ca=str(files.ca),
        )

    @classmethod
    def from_contexts(
        cls, *, node: str, server: ssl.SSLContext, client: ssl.SSLContext
    ) -> ChannelSecurity:
        """Contexts made elsewhere (see :mod:`fogmig.platform.security.tls`) for node ``node``."""
        for ctx in (server, client):
            if ctx.verify_mode != ssl.CERT_REQUIRED:
                raise ConfigError("the transfer channel's TLS contexts must require certificates")
        return cls(node=check_node_name(node), server=server, client=client)

    @classmethod
    def plaintext_for_benchmarks(cls, node: str) -> ChannelSecurity:
        """No TLS at all: the baseline of the transfer benchmark, never for an agent.

        Anyone on the link can read, alter and inject data, and pose as any node.
        """
        return cls(node=check_node_name(node), server=None, client=None, cert="none", ca="none")

    @property
    def plaintext(self) -> bool:
        return self.server is None or self.client is None

    @property
    def identity(self) -> Identity:
        return Identity.node(self.node)

    @property
    def hint(self) -> str:
        """What to check when a peer and this node do not accept each other."""
        if self.plaintext:
            return "both ends must use the same mode (the benchmark's plaintext mode or TLS)"
        return (
            f"both nodes need a certificate of the same site CA naming them as nodes: this "
            f"node ({self.node}) presents {self.cert} and trusts {self.ca}; on the testbed, "
            "`fogmig testbed down` then `fogmig testbed up` issues them afresh"
        )
