"""An agent's configuration: :class:`AgentConfig`, from a TOML file or from the testbed.

On the embedded testbed an agent learns everything from the testbed's state; on a real gateway
(a fog node that is a real machine) ``fogmig agent --config FILE`` reads its name, data address,
peers, broker and the paths of its identity (the node's certificate and key, and the site CA's
certificate) from a file like ``compose/agent-gw1.toml``. The identity serves both the transfer
channel and the broker (MQTT over TLS, the certificate's common name being the user name).
Relative paths are taken from the configuration file's folder.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fogmig.platform.base.errors import ConfigError, SecurityError, UnknownNodeError
from fogmig.platform.base.nodes import check_node_name
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import IdentityFiles, certificate_identity, load_certificate

DEFAULT_BROKER_PORT = 1883
DEFAULT_TRANSFER_PORT = 7700

Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSection(_Model):
    host: str = Field(min_length=1)
    port: Port = DEFAULT_BROKER_PORT
    username: str | None = None
    """Only for a broker that authenticates by password: defaults to the node's name."""
    password_file: Path | None = None
    """Only for a broker that authenticates by password; a site's broker takes certificates."""


class TransferSection(_Model):
    cert_file: Path
    """This node's certificate (PEM), issued by the site CA for ``fogmig:node:<node>``."""
    key_file: Path
    """Its private key (PEM), readable by the agent only."""
    ca_file: Path
    """The site CA's certificate (PEM): peers must present a certificate it issued."""
    port: Port = DEFAULT_TRANSFER_PORT


class AgentFile(_Model):
    """The file's shape, before the secrets are read."""

    node: str
    data_ip: str
    peers: dict[str, str] = Field(default_factory=dict)
    """Every other node: name -> data IP."""
    broker: BrokerSection
    transfer: TransferSection
    status_interval_s: float = Field(default=5.0, gt=0, le=3600)
    fence_timeout_s: float = Field(default=20.0, gt=0, le=3600)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """A validated agent configuration with its secrets read."""

    node: str
    data_ip: str
    peers: dict[str, str]
    broker_host: str
    broker_port: int
    mqtt_username: str
    mqtt_password: str | None
    identity: IdentityFiles
    transfer_port: int
    status_interval_s: float
    fence_timeout_s: float


def _ip(value: str, what: str, source: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{source}: {what} {value!r} is not an IP address") from None


def _read_secret(path: Path, what: str, source: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read the {what} file {path}: {exc.strerror}",
            hint="create it (readable by root only) or fix the path",
        ) from None
    if not text:
        raise ConfigError(f"{source}: the {what} file {path} is empty")
    return text


def _transfer_identity(
    section: TransferSection, node: str, root: Path, source: str
) -> IdentityFiles:
    """The node's key material for the transfer channel; its certificate must name ``node``."""
    files = IdentityFiles(
        identity=Identity.node(node),
        cert=root / section.cert_file,
        key=root / section.key_file,
        ca=root / section.ca_file,
    )
    for what, path in (
        ("certificate", files.cert),
        ("key", files.key),
        ("CA certificate", files.ca),
    ):
        if not path.is_file():
            raise ConfigError(
                f"{source}: the transfer {what} {path} does not exist",
                hint="make the site's CA and node certificates with compose/make-secrets.sh, "
                "or fix the path",
            )
    try:
        named = certificate_identity(load_certificate(files.cert))
    except SecurityError as exc:
        raise ConfigError(f"{source}: the transfer certificate {files.cert}: {exc}") from None
    if named != files.identity:
        raise ConfigError(
            f"{source}: the transfer certificate {files.cert} is for {named}, not this node "
            f"({files.identity})",
            hint=f"give node {node} its own certificate",
        )
    return files


def parse_agent_config(
    text: str, *, source: str = "agent config", base: Path | None = None
) -> AgentSettings:
    """Parse and validate a configuration's text; ``base`` resolves relative paths."""
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    try:
        raw = AgentFile.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ConfigError(f"invalid {source}: {problems}") from None
    node = check_node_name(raw.node)
    data_ip = _ip(raw.data_ip, "data_ip", source)
    peers: dict[str, str] = {}
    for name, ip in raw.peers.items():
        check_node_name(name)
        if name == node:
            raise ConfigError(f"{source}: node {node} lists itself as a peer")
        peers[name] = _ip(ip, f"the data IP of peer {name}", source)
    if data_ip in peers.values():
        raise ConfigError(f"{source}: a peer has this node's own data IP {data_ip}")
    root = base or Path.cwd()
    password = (
        None
        if raw.broker.password_file is None
        else _read_secret(root / raw.broker.password_file, "MQTT password", source)
    )
    identity = _transfer_identity(raw.transfer, node, root, source)
    return AgentSettings(
        node=node,
        data_ip=data_ip,
        peers=peers,
        broker_host=raw.broker.host,
        broker_port=raw.broker.port,
        mqtt_username=raw.broker.username or node,
        mqtt_password=password,
        identity=identity,
        transfer_port=raw.transfer.port,
        status_interval_s=raw.status_interval_s,
        fence_timeout_s=raw.fence_timeout_s,
    )


def load_agent_config(path: Path) -> AgentSettings:
    """Read ``path`` (TOML) and validate it; paths relative to its folder."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the agent configuration {path}: {exc.strerror}") from None
    return parse_agent_config(text, source=str(path), base=path.resolve().parent)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything one node's agent needs to know about itself and its peers."""

    node: str
    data_ip: str
    peers: dict[str, str]  # node -> data IP
    broker_host: str
    broker_port: int
    mqtt_username: str
    mqtt_password: str | None
    identity: IdentityFiles
    """The node's certificate, key and the site CA's certificate (transfer channel)."""
    transfer_port: int = DEFAULT_TRANSFER_PORT
    status_interval_s: float = 5.0
    fence_timeout_s: float = 20.0
    link_probe_interval_s: float = 60.0
    link_probe_bytes: int = 2 * 1024 * 1024

    @classmethod
    def from_file(cls, path: Path) -> AgentConfig:
        """The configuration of a real node from a TOML file (see ``compose/``)."""
        s = load_agent_config(path)
        return cls(
            node=s.node,
            data_ip=s.data_ip,
            peers=dict(s.peers),
            broker_host=s.broker_host,
            broker_port=s.broker_port,
            mqtt_username=s.mqtt_username,
            mqtt_password=s.mqtt_password,
            identity=s.identity,
            transfer_port=s.transfer_port,
            status_interval_s=s.status_interval_s,
            fence_timeout_s=s.fence_timeout_s,
        )

    @classmethod
    def from_testbed(cls, node: str) -> AgentConfig:
        """The configuration of ``node`` on the embedded testbed."""
        from fogmig.platform.testbed.pki import node_identity
        from fogmig.platform.testbed.state import load_state

        state = load_state()
        nodes = {n.name: n for n in state.nodes}
        if node not in nodes:
            raise UnknownNodeError(
                f"the testbed has no node {node!r}; nodes: {', '.join(sorted(nodes))}"
            )
        return cls(
            node=node,
            data_ip=nodes[node].data_ip,
            peers={n: info.data_ip for n, info in nodes.items() if n != node},
            broker_host=state.broker.ip,
            broker_port=state.broker.port,
            mqtt_username=node,
            mqtt_password=None,
            identity=node_identity(node),
        )
