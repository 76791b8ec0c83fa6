"""The exception tree of fogmig: one root, grouped subtrees, each carrying what explains it.

Lower layers raise these (never a bare ``Exception``); the CLI and the agents translate them at
the boundary into an exit code, a message with a hint, or a typed rejection event on the bus.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class FogmigError(Exception):
    """Root of every error fogmig raises on purpose.

    ``hint`` tells an operator what to do about it; the CLI prints it under the message.
    """

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(FogmigError):
    """A profile, option or file the user gave is invalid."""


class SetupError(FogmigError):
    """The machine lacks something the platform needs (see ``fogmig doctor``)."""

    hint = "run `make setup`, then `fogmig doctor` to see what is missing"


class RuntimeToolError(FogmigError):
    """An external tool (runc, criu, ip, iptables, nsenter ...) failed.

    Carries the command, its exit code, the tail of its stderr and, for CRIU, the log file
    that explains the failure.
    """

    def __init__(
        self,
        message: str,
        *,
        cmd: Sequence[str],
        returncode: int | None,
        stderr: str = "",
        log_path: Path | None = None,
        hint: str | None = None,
    ) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        self.log_path = log_path
        detail = f"{message}: `{' '.join(self.cmd)}` exited {returncode}"
        if stderr.strip():
            detail += f": {stderr.strip().splitlines()[-1]}"
        if log_path is not None:
            detail += f" (log: {log_path})"
        super().__init__(detail, hint=hint)


class CriuError(RuntimeToolError):
    """CRIU (directly or through runc) failed; ``log_path`` names the CRIU log."""


class ContainerNotFoundError(FogmigError):
    """No container of that name exists on that node."""


class ServiceError(FogmigError):
    """A service could not be deployed, reached or verified."""


class TestbedError(FogmigError):
    """The embedded testbed could not be brought up, probed or torn down."""

    __test__ = False  # not a pytest test class despite the name


class UnknownNodeError(FogmigError):
    """A node name that the testbed or the bus does not know."""


class TransferError(FogmigError):
    """The agent-to-agent state transfer failed (auth, integrity, path, peer or link)."""


class MigrationError(FogmigError):
    """A migration failed; ``phase`` says where, ``migration_id`` which one."""

    def __init__(
        self, message: str, *, phase: str, migration_id: str, hint: str | None = None
    ) -> None:
        self.phase = phase
        self.migration_id = migration_id
        super().__init__(f"migration {migration_id} failed in {phase}: {message}", hint=hint)


class BusError(FogmigError):
    """The MQTT bus rejected, dropped or could not deliver a message."""


class SecurityError(FogmigError):
    """Key or certificate material is missing, unreadable or kept unsafely."""

    hint = "on the testbed, `fogmig testbed down` then `fogmig testbed up` issues it afresh"


class IdentityError(SecurityError):
    """A peer could not prove an identity, or proved one other than the expected principal."""

    hint = (
        "check that both ends hold certificates of the same site CA and that the address "
        "reaches the intended principal; `fogmig testbed up` issues the testbed's certificates"
    )


class FenceError(FogmigError):
    """A migration's fence could not be armed, extended, disarmed or read."""

    hint = "see the node's fence log (<run dir>/nodes/<node>/fence.log)"


class FenceFiredError(FenceError):
    """The fence fired, or its lease ran out: the copy it guards is dead and must stay dead."""

    hint = "the migration cannot commit any more; tombstone it (fenced)"


class StateFileError(FogmigError):
    """A daemon's saved state is unreadable, corrupt, of another format or of another site.

    The file is moved aside (``kept``) and the daemon starts without it, so a bad file never
    makes it fail at every start.
    """

    def __init__(self, message: str, *, kept: Path | None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kept = kept
