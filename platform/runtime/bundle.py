"""OCI bundles for fogmig's service containers: one ``config.json`` per container.

The rootfs is the shared, read-only service image; the container joins its node's network
namespace and owns its pid, ipc, uts and mount namespaces. CRIU's restore-only options travel in
a per-bundle config file named by the ``org.criu.config`` annotation (docs/platform.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fogmig.platform.base.errors import ConfigError

CRIU_CONFIG_ANNOTATION = "org.criu.config"
RESTORE_CONF_NAME = "restore.conf"
# The rootfs is bind-mounted by runc, and CRIU's default mount engine (mount-v2) cannot restore
# that here ("Failed to move_mount"); the dump rejects this option, so it is restore-only.
RESTORE_OPTIONS = ("mntns-compat-mode",)
OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A CoAP service on an unprivileged port needs no capability at all; these three are runc's
# own minimal default and cost nothing.
CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def _mounts() -> list[dict[str, Any]]:
    # No /sys and no cgroup mount: the service needs neither, and every mount is one more
    # thing CRIU must dump and recreate on another node.
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        # The image is shared and read-only; the service writes its log and runtime files here.
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/run",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=755", "size=16384k"],
        },
    ]


def bundle_config(
    *,
    rootfs: Path,
    args: Sequence[str],
    netns_path: Path | None,
    cgroups_path: str,
    hostname: str,
    env: Mapping[str, str] | None = None,
    criu_config: Path | None = None,
) -> dict[str, Any]:
    """The OCI runtime config (``config.json`` contents) of one service container.

    ``netns_path`` joins an existing network namespace (the node's); ``None`` gives the
    container a fresh, empty one. ``criu_config`` is the file the ``org.criu.config``
    annotation names.
    """
    if not args:
        raise ConfigError("a container needs a command (args is empty)")
    if not rootfs.is_absolute():
        raise ConfigError(f"the rootfs path must be absolute, got {rootfs}")
    if not cgroups_path.startswith("/"):
        # A relative cgroupsPath lands below the cgroup of whoever runs runc, which differs
        # between the CLI, an agent and a test; an absolute one is the same everywhere.
        raise ConfigError(f"cgroups_path must be absolute, got {cgroups_path!r}")
    environment = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    environment.update(env or {})
    network: dict[str, str] = {"type": "network"}
    if netns_path is not None:
        network["path"] = str(netns_path)
    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [f"{k}={v}" for k, v in environment.items()],
            "cwd": "/",
            "capabilities": {
                "bounding": list(CAPABILITIES),
                "effective": list(CAPABILITIES),
                "permitted": list(CAPABILITIES),
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname,
        "mounts": _mounts(),
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"},
                network,
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if criu_config is not None:
        config["annotations"] = {CRIU_CONFIG_ANNOTATION: str(criu_config)}
    return config


def restore_conf_text(options: Sequence[str] = RESTORE_OPTIONS) -> str:
    """A CRIU config file: one long option per line, without the leading dashes."""
    return "".join(f"{opt.removeprefix('--')}\n" for opt in options)


def make_bundle(
    directory: Path,
    *,
    rootfs: Path,
    args: Sequence[str],
    netns_path: Path | None,
    restore_conf: bool,
    cgroups_path: str,
    hostname: str,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Write ``directory/config.json`` (and ``restore.conf`` when asked); return ``directory``.

    A bundle that a container may be restored from needs ``restore_conf``; the runtime keeps
    that file out of the way while it dumps (the dump refuses restore-only options).
    """
    if not rootfs.is_dir():
        raise ConfigError(f"rootfs {rootfs} is not a directory")
    if netns_path is not None and not netns_path.exists():
        raise ConfigError(f"network namespace {netns_path} does not exist")
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    criu_config = directory / RESTORE_CONF_NAME if restore_conf else None
    config = bundle_config(
        rootfs=rootfs.absolute(),
        args=args,
        netns_path=netns_path,
        cgroups_path=cgroups_path,
        hostname=hostname,
        env=env,
        criu_config=criu_config,
    )
    if criu_config is not None:
        _write_atomic(criu_config, restore_conf_text())
    _write_atomic(directory / "config.json", json.dumps(config, indent=2) + "\n")
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of a bundle."""
    try:
        data: dict[str, Any] = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the bundle config in {directory}: {exc}") from exc
    return data


def criu_config_path(config: Mapping[str, Any]) -> Path | None:
    """The CRIU config file a bundle's annotation names, if any."""
    value = (config.get("annotations") or {}).get(CRIU_CONFIG_ANNOTATION)
    return Path(value) if value else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
