"""Secrets of the testbed: an MQTT password per principal.

Generated at random by ``testbed up`` and kept, readable by root only, in
``state_dir()/testbed/credentials.json``; agents, the controller and the device host read them.
The agents authenticate each other with their certificates (``testbed.pki``), not a secret.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from fogmig.platform.base.errors import TestbedError, UnknownNodeError
from fogmig.platform.testbed.state import testbed_state_dir


class TestbedCredentials(BaseModel):
    """MQTT user -> password."""

    __test__ = False  # not a pytest test class despite the name
    model_config = ConfigDict(extra="forbid", frozen=True)

    mqtt: dict[str, str]

    def password(self, user: str) -> str:
        try:
            return self.mqtt[user]
        except KeyError:
            raise UnknownNodeError(f"the testbed has no MQTT credential for {user!r}") from None


def credentials_path() -> Path:
    return testbed_state_dir() / "credentials.json"


def generate_credentials(users: Iterable[str]) -> TestbedCredentials:
    return TestbedCredentials(
        mqtt={u: secrets.token_urlsafe(18) for u in users},
    )


def save_credentials(creds: TestbedCredentials) -> Path:
    """Write with mode 0600 from the start (never briefly world-readable)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(creds.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    return path


def load_credentials() -> TestbedCredentials:
    path = credentials_path()
    try:
        return TestbedCredentials.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise TestbedError(f"no testbed credentials at {path}", hint="fogmig testbed up") from None
    except ValidationError as exc:
        raise TestbedError(f"unreadable testbed credentials {path}: {exc}") from exc


def remove_credentials() -> None:
    credentials_path().unlink(missing_ok=True)
