"""The compose files for real machines, checked without a Docker engine: every command is a
real ``fogmig`` subcommand (parsed by the CLI's own parser), every mounted configuration file
exists (secrets come from make-secrets.sh), the agents get the privileges runc and CRIU need,
the site description, the agents' files and the broker's ACL agree, and the certificates that
make-certs.sh issues with openssl carry the agents' mutual TLS."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fogmig.platform.agent.config import AgentSettings, parse_agent_config
from fogmig.platform.cli.main import build_parser
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import create_ca, issue, save_ca, save_identity
from fogmig.platform.testbed.broker import acl_rules, render_acl
from fogmig.platform.testbed.state import TestbedState

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
SERVICES = ("broker", "controller", "image", "agent")


def env_defaults() -> dict[str, str]:
    out = {}
    for line in (COMPOSE / ".env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} has no value ({arg})")

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    text = interpolate((COMPOSE / "docker-compose.yml").read_text(), env_defaults())
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def site() -> TestbedState:
    return TestbedState.model_validate_json((COMPOSE / "site" / "state.json").read_text())


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every short-syntax volume."""
    out = []
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        out.append((source, target))
    return out


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == set(SERVICES)
    assert services["broker"]["image"].startswith("eclipse-mosquitto:")
    for name in ("broker", "controller"):
        assert services[name]["profiles"] == ["control"]
    for name in ("image", "agent"):
        assert services[name]["profiles"] == ["gateway"]
    build = services["agent"]["build"]
    # The context is relative to this folder; the Dockerfile is relative to the context.
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve().is_file()


def test_every_command_is_a_real_fogmig_subcommand(compose: dict[str, Any]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fogmig"] == "fogmig.platform.cli.main:main"
    parser = build_parser()
    checked = 0
    for name, service in compose["services"].items():
        command = service.get("command")
        if service.get("image", "").startswith("eclipse-mosquitto"):
            assert command is None  # the image's own mosquitto with our configuration
            continue
        assert isinstance(command, list), f"{name}: use the list form of command"
        assert command[0] == "fogmig", name
        try:
            args = parser.parse_args(command[1:])
        except SystemExit as exc:
            raise AssertionError(f"{name}: `{' '.join(command)}` does not parse") from exc
        assert callable(getattr(args, "func", None)), name
        checked += 1
    assert checked == 3


def test_agent_command_names_its_mounted_config(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    args = build_parser().parse_args(agent["command"][1:])
    assert str(args.config) in {target for _, target in mounts(agent)}


def test_mounted_files_exist_or_are_made_by_make_secrets(compose: dict[str, Any]) -> None:
    script = (COMPOSE / "make-certs.sh").read_text()
    made_names = {"ca.pem", "ca.key", "controller.pem", "controller.key", "broker.pem"}
    made_names |= {"broker.key", "operator.pem", "operator.key"}
    assert all(f"issue {stem} " in script for stem in ("controller", "operator", "broker"))
    for name, service in compose["services"].items():
        for source, _ in mounts(service):
            if not source.startswith("./"):
                continue
            if source == "./secrets" or source.startswith("./secrets/"):
                made = Path(source).name
                assert made == "secrets" or made in made_names, (name, source)
                continue
            assert (COMPOSE / source).is_file(), f"{name} mounts {source}, which is missing"


def test_agent_has_the_privileges_runc_and_criu_need(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    assert agent["privileged"] is True
    assert agent["network_mode"] == "host"
    assert agent["pid"] == "host"
    targets = {target for _, target in mounts(agent)}
    for needed in ("/sys/fs/cgroup", "/var/run/netns", "/run/fogmig", "/var/lib/fogmig"):
        assert needed in targets, needed
    sources = {source for source, _ in mounts(agent)}
    assert {"/sys/fs/cgroup", "/var/run/netns", "/run/fogmig", "/var/lib/fogmig"} <= sources


def test_broker_config_uses_the_mounted_files(compose: dict[str, Any]) -> None:
    conf = (COMPOSE / "mosquitto" / "mosquitto.conf").read_text()
    settings = dict(
        line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#")
    )
    assert settings["allow_anonymous"] == "false"
    assert settings["require_certificate"] == "true"
    assert settings["use_identity_as_username"] == "true"
    assert settings["use_username_as_clientid"] == "true"
    assert settings["persistence"] == "true"
    assert int(settings["max_packet_size"]) > 64 * 1024
    assert "password_file" not in settings
    targets = {target for _, target in mounts(compose["services"]["broker"])}
    for key in ("acl_file", "cafile", "certfile", "keyfile"):
        assert settings[key] in targets, key
    assert settings["persistence_location"].rstrip("/") in targets


def test_controller_finds_site_and_certificate_where_the_code_reads_them(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fogmig.platform.security.identity import Identity
    from fogmig.platform.security.pki import identity_files
    from fogmig.platform.testbed.pki import pki_dir
    from fogmig.platform.testbed.state import state_path

    monkeypatch.delenv("FOGMIG_RUN_DIR", raising=False)
    monkeypatch.delenv("FOGMIG_STATE_DIR", raising=False)
    targets = {target for _, target in mounts(compose["services"]["controller"])}
    assert str(state_path()) in targets
    files = identity_files(pki_dir(), Identity.controller())
    assert {str(files.cert), str(files.key), str(files.ca)} <= targets


def agent_settings(path: Path, tmp_path: Path) -> AgentSettings:
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    if not (secrets / "ca.pem").exists():
        ca = create_ca()
        save_ca(ca, secrets)
        for node in ("gw1", "gw2", "gw3"):
            save_identity(issue(ca, Identity.node(node)), secrets)
    return parse_agent_config(path.read_text(), source=path.name, base=tmp_path)


def test_site_agents_and_acl_agree(site: TestbedState, tmp_path: Path) -> None:
    files = sorted(COMPOSE.glob("agent-*.toml"))
    agents = {s.node: s for s in (agent_settings(f, tmp_path) for f in files)}
    assert [f.stem for f in files] == [f"agent-{n}" for n in sorted(agents)]
    data_ips = {n.name: n.data_ip for n in site.nodes}
    assert set(agents) == set(data_ips)
    for node, s in agents.items():
        assert s.data_ip == data_ips[node]
        assert s.peers == {n: ip for n, ip in data_ips.items() if n != node}
        assert (s.broker_host, s.broker_port) == (site.broker.ip, site.broker.port)
        assert s.mqtt_password is None  # the broker knows the agent by its certificate
    want = render_acl(acl_rules(site.node_names))

    def rules(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    assert rules((COMPOSE / "mosquitto" / "acl").read_text()) == rules(want)


def test_make_secrets_makes_the_certificates_the_agents_name() -> None:
    script = (COMPOSE / "make-secrets.sh").read_text()
    assert "./make-certs.sh" in script
    for path in sorted(COMPOSE.glob("agent-*.toml")):
        node = path.stem.removeprefix("agent-")
        transfer = tomllib.loads(path.read_text())["transfer"]
        assert transfer["cert_file"] == f"secrets/node-{node}.pem"
        assert transfer["key_file"] == f"secrets/node-{node}.key"
        assert transfer["ca_file"] == "secrets/ca.pem"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_make_certs_issues_certificates_the_transfer_channel_accepts(tmp_path: Path) -> None:
    from fogmig.platform.transfer.client import TransferClient
    from fogmig.platform.transfer.server import TransferServer

    shutil.copy(COMPOSE / "make-certs.sh", tmp_path)
    subprocess.run(
        [str(tmp_path / "make-certs.sh"), "gw1", "gw2"],
        check=True,
        capture_output=True,
        env={**os.environ, "DEVICES": "d0 d1"},
    )
    secrets = tmp_path / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert (secrets / "node-gw1.key").stat().st_mode & 0o077 == 0
    # The other principals of the site, the broker with the address its clients check.
    from cryptography import x509

    from fogmig.platform.security.pki import certificate_identity, load_certificate

    for stem, identity in (
        ("controller", Identity.controller()),
        ("operator", Identity.operator()),
        ("device-d0", Identity.device("d0")),
        ("device-d1", Identity.device("d1")),
        ("broker", Identity.broker()),
    ):
        assert certificate_identity(load_certificate(secrets / f"{stem}.pem")) == identity
        assert (secrets / f"{stem}.key").stat().st_mode & 0o077 == 0
    san = load_certificate(secrets / "broker.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["192.168.50.2"]
    settings = {}
    for node in ("gw1", "gw2"):
        text = (COMPOSE / f"agent-{node}.toml").read_text()
        settings[node] = parse_agent_config(text, base=tmp_path)

    class Echo:
        async def on_call(self, session: Any, op: str, params: dict[str, Any]) -> dict[str, Any]:
            return {"peer": session.peer}

    async def talk() -> str:
        async with (
            TransferServer(
                host="127.0.0.1",
                port=0,
                security=settings["gw2"].identity,
                root=tmp_path,
                handler=Echo(),
            ) as server,
            TransferClient.connect(
                "127.0.0.1", server.port, security=settings["gw1"].identity, peer="gw2"
            ) as client,
        ):
            return str((await client.call("echo"))["peer"])

    assert asyncio.run(talk()) == "gw1"
