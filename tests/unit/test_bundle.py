"""OCI bundle generation: the config.json shape runc and CRIU rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fogmig.platform.base.errors import ConfigError
from fogmig.platform.runtime.bundle import (
    CRIU_CONFIG_ANNOTATION,
    RESTORE_CONF_NAME,
    bundle_config,
    criu_config_path,
    make_bundle,
    read_config,
    restore_conf_text,
)

ARGS = ["python3", "/opt/fogmig/sensor.py", "--state-mb", "8"]


def _make(tmp_path: Path, *, restore_conf: bool = True) -> dict[str, object]:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir(exist_ok=True)
    netns = tmp_path / "netns-gw1"
    netns.touch()
    bundle = make_bundle(
        tmp_path / "bundle",
        rootfs=rootfs,
        args=ARGS,
        netns_path=netns,
        restore_conf=restore_conf,
        cgroups_path="/fogmig/gw1/sensor",
        hostname="sensor",
        env={"SENSOR_MODE": "test"},
    )
    data: dict[str, object] = json.loads((bundle / "config.json").read_text())
    return data


def test_config_shape(tmp_path: Path) -> None:
    cfg = _make(tmp_path)
    assert cfg["ociVersion"] == "1.0.2"
    root = cfg["root"]
    assert root == {"path": str(tmp_path / "rootfs"), "readonly": True}
    process = cfg["process"]
    assert isinstance(process, dict)
    assert process["terminal"] is False
    assert process["args"] == ARGS
    assert "SENSOR_MODE=test" in process["env"]
    assert any(e.startswith("PATH=") for e in process["env"])
    assert process["noNewPrivileges"] is True
    caps = process["capabilities"]
    assert "CAP_SYS_ADMIN" not in caps["bounding"]
    assert len(caps["bounding"]) <= 3
    assert cfg["hostname"] == "sensor"


def test_namespaces_join_the_node_network(tmp_path: Path) -> None:
    cfg = _make(tmp_path)
    linux = cfg["linux"]
    assert isinstance(linux, dict)
    spaces = {ns["type"]: ns for ns in linux["namespaces"]}
    assert set(spaces) == {"pid", "network", "ipc", "uts", "mount"}
    assert spaces["network"] == {"type": "network", "path": str(tmp_path / "netns-gw1")}
    assert "path" not in spaces["pid"]
    assert linux["cgroupsPath"] == "/fogmig/gw1/sensor"


def test_tmpfs_on_tmp_and_run(tmp_path: Path) -> None:
    cfg = _make(tmp_path)
    mounts = cfg["mounts"]
    assert isinstance(mounts, list)
    by_dest = {m["destination"]: m for m in mounts}
    for dest in ("/tmp", "/run", "/proc", "/dev"):
        assert dest in by_dest
    assert by_dest["/tmp"]["type"] == "tmpfs"
    assert by_dest["/run"]["type"] == "tmpfs"
    # No host path is bind-mounted into the container: the image stays the only file source.
    assert all(m["type"] != "bind" for m in mounts)


def test_restore_conf_annotation_and_file(tmp_path: Path) -> None:
    cfg = _make(tmp_path)
    conf = tmp_path / "bundle" / RESTORE_CONF_NAME
    assert cfg["annotations"] == {CRIU_CONFIG_ANNOTATION: str(conf)}
    lines = conf.read_text().splitlines()
    assert "mntns-compat-mode" in lines
    assert all(not line.startswith("-") for line in lines)
    assert criu_config_path(read_config(tmp_path / "bundle")) == conf


def test_without_restore_conf_no_annotation(tmp_path: Path) -> None:
    cfg = _make(tmp_path, restore_conf=False)
    assert "annotations" not in cfg
    assert not (tmp_path / "bundle" / RESTORE_CONF_NAME).exists()


def test_fresh_network_namespace_when_no_path() -> None:
    cfg = bundle_config(
        rootfs=Path("/images/x/rootfs"),
        args=["true"],
        netns_path=None,
        cgroups_path="/fogmig/t/x",
        hostname="x",
    )
    spaces = {ns["type"]: ns for ns in cfg["linux"]["namespaces"]}
    assert spaces["network"] == {"type": "network"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"args": []}, "command"),
        ({"rootfs": Path("relative/rootfs")}, "absolute"),
        ({"cgroups_path": "fogmig/x"}, "cgroups_path"),
    ],
)
def test_bad_values_raise_config_error(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "rootfs": Path("/images/x/rootfs"),
        "args": ["true"],
        "netns_path": None,
        "cgroups_path": "/fogmig/t/x",
        "hostname": "x",
    }
    base.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        bundle_config(**base)  # type: ignore[arg-type]


def test_missing_rootfs_or_netns(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rootfs"):
        make_bundle(
            tmp_path / "b",
            rootfs=tmp_path / "nope",
            args=["true"],
            netns_path=None,
            restore_conf=False,
            cgroups_path="/fogmig/t/x",
            hostname="x",
        )
    (tmp_path / "rootfs").mkdir()
    with pytest.raises(ConfigError, match="network namespace"):
        make_bundle(
            tmp_path / "b",
            rootfs=tmp_path / "rootfs",
            args=["true"],
            netns_path=tmp_path / "no-such-netns",
            restore_conf=False,
            cgroups_path="/fogmig/t/x",
            hostname="x",
        )


def test_restore_conf_text_strips_dashes() -> None:
    assert (
        restore_conf_text(["--mntns-compat-mode", "tcp-close"]) == "mntns-compat-mode\ntcp-close\n"
    )
