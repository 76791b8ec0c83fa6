"""Where fogmig keeps its files on a node: state, runtime sockets, caches.

Each location can be moved with an environment variable, so tests and several checkouts can
share one machine without stepping on each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def _dir(env: str, default: str) -> Path:
    return Path(os.environ.get(env, default))


def state_dir() -> Path:
    """Persistent state: container bundles, migration images, records (FOGMIG_STATE_DIR)."""
    return _dir("FOGMIG_STATE_DIR", "/var/lib/fogmig")


def run_dir() -> Path:
    """Volatile state: runc roots, sockets, pid files, testbed description (FOGMIG_RUN_DIR)."""
    return _dir("FOGMIG_RUN_DIR", "/run/fogmig")


def cache_dir() -> Path:
    """Rebuildable caches: the service rootfs images (FOGMIG_CACHE_DIR)."""
    return _dir("FOGMIG_CACHE_DIR", "/var/cache/fogmig")


def node_dir(node: str) -> Path:
    """Per-node state on this machine; on the testbed every fog node has its own."""
    return state_dir() / "nodes" / node


def records_dir() -> Path:
    """Migration records (JSON per migration, one CSV appended)."""
    return state_dir() / "records"


def controller_state_file() -> Path:
    """Where the controller keeps what must outlive its restart (FOGMIG_STATE_DIR)."""
    return state_dir() / "controller" / "state.json"
