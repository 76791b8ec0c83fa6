"""An agent's TOML configuration for a real node: parsing, validation with clear messages,
secrets and the node's certificate found relative to the file, and
``AgentConfig.from_file``/``fogmig agent --config``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogmig.platform.agent.config import AgentConfig, load_agent_config, parse_agent_config
from fogmig.platform.base.errors import ConfigError
from fogmig.platform.cli.main import build_parser
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import IdentityFiles, create_ca, issue, save_ca, save_identity

GOOD = """
node = "gw1"
data_ip = "192.168.60.11"
status_interval_s = 2.5

[peers]
gw2 = "192.168.60.12"
gw3 = "192.168.60.13"

[broker]
host = "192.168.50.2"
password_file = "secrets/gw1.password"

[transfer]
cert_file = "secrets/node-gw1.pem"
key_file = "secrets/node-gw1.key"
ca_file = "secrets/ca.pem"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "gw1.password").write_text("s3cret\n")
    ca = create_ca()
    save_ca(ca, tmp_path / "secrets")
    for node in ("gw1", "gw2"):
        save_identity(issue(ca, Identity.node(node)), tmp_path / "secrets")
    (tmp_path / "agent.toml").write_text(GOOD)
    return tmp_path


def test_good_file(folder: Path) -> None:
    s = load_agent_config(folder / "agent.toml")
    assert (s.node, s.data_ip) == ("gw1", "192.168.60.11")
    assert s.peers == {"gw2": "192.168.60.12", "gw3": "192.168.60.13"}
    assert (s.broker_host, s.broker_port, s.mqtt_username) == ("192.168.50.2", 1883, "gw1")
    assert s.mqtt_password == "s3cret"
    assert s.identity == IdentityFiles(
        identity=Identity.node("gw1"),
        cert=folder / "secrets" / "node-gw1.pem",
        key=folder / "secrets" / "node-gw1.key",
        ca=folder / "secrets" / "ca.pem",
    )
    assert (s.transfer_port, s.status_interval_s, s.fence_timeout_s) == (7700, 2.5, 20.0)


def test_agent_config_from_file(folder: Path) -> None:
    c = AgentConfig.from_file(folder / "agent.toml")
    assert (c.node, c.data_ip, c.mqtt_username, c.mqtt_password) == (
        "gw1",
        "192.168.60.11",
        "gw1",
        "s3cret",
    )
    assert c.peers == {"gw2": "192.168.60.12", "gw3": "192.168.60.13"}
    assert c.identity.cert == folder / "secrets" / "node-gw1.pem"
    assert c.status_interval_s == 2.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('node = "gw1"', 'node = "GW 1"'), "node"),
        (('data_ip = "192.168.60.11"', 'data_ip = "gw1.local"'), "not an IP address"),
        (('gw2 = "192.168.60.12"', 'gw1 = "192.168.60.12"'), "lists itself"),
        (('gw3 = "192.168.60.13"', 'gw3 = "192.168.60.11"'), "own data IP"),
        (("[transfer]", "[transfer]\nbogus = 1"), "bogus"),
        (('cert_file = "secrets/node-gw1.pem"\n', ""), "transfer.cert_file"),
        (("secrets/node-gw1.key", "secrets/missing.key"), "transfer key .*missing.key"),
        (("secrets/ca.pem", "secrets/nope.pem"), "CA certificate .*does not exist"),
        (("secrets/node-gw1.pem", "secrets/node-gw2.pem"), "fogmig:node:gw2, not this node"),
        (("secrets/node-gw1.pem", "secrets/gw1.password"), "unreadable certificate"),
        (('host = "192.168.50.2"', 'host = "192.168.50.2"\nport = 70000'), "broker.port"),
        (("secrets/gw1.password", "secrets/missing.password"), "cannot read the MQTT password"),
        (("node = ", "node == "), "not valid TOML"),
        (('[broker]\nhost = "192.168.50.2"\n', ""), "broker"),
    ],
)
def test_bad_files_are_refused_with_a_reason(
    folder: Path, change: tuple[str, str], message: str
) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(ConfigError, match=message):
        parse_agent_config(text, base=folder)


def test_the_old_shared_secret_is_refused(folder: Path) -> None:
    text = GOOD.replace(
        'cert_file = "secrets/node-gw1.pem"', 'secret_file = "secrets/transfer.secret"'
    )
    with pytest.raises(ConfigError, match="secret_file"):
        parse_agent_config(text, base=folder)


def test_cli_refuses_a_mismatched_node_and_no_node(folder: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["agent", "--node", "gw2", "--config", str(folder / "agent.toml")])
    with pytest.raises(ConfigError, match="configures gw1"):
        args.func(args)
    args = parser.parse_args(["agent"])
    with pytest.raises(ConfigError, match="--config FILE"):
        args.func(args)
