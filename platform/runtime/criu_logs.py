"""Reading CRIU's own logs, so that an error names CRIU's explanation and not only runc's.

CRIU writes ``dump.log`` and ``restore.log`` into the work directory of each operation; every
line starts with ``(seconds since start)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from fogmig.platform.base.errors import CriuError

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
# Logged by every CRIU run here (no CAP_SYS_RESOURCE) and harmless: never the explanation.
HARMLESS_ERRORS = ("rlimit: Can't setup RLIMIT_NOFILE",)
LOG_PREFIX = re.compile(r"^\(\s*[\d.]+\)\s*")


def criu_log_errors(text: str, limit: int = 3) -> list[str]:
    """The last ``limit`` meaningful "Error" lines of a CRIU log, without their timestamps."""
    lines = [
        LOG_PREFIX.sub("", line).strip()
        for line in text.splitlines()
        if "Error" in line and not any(h in line for h in HARMLESS_ERRORS)
    ]
    return lines[-limit:]


def read_log(path: Path) -> str:
    """The text of a log file; empty if it cannot be read (a tool that died before writing)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def criu_error(
    message: str,
    *,
    cmd: Sequence[str],
    returncode: int | None,
    stderr: str,
    log_path: Path,
) -> CriuError:
    """A :class:`CriuError` whose message carries the last Error lines of ``log_path``."""
    errors = criu_log_errors(read_log(log_path))
    if errors:
        message = f"{message}: {' | '.join(errors)}"
    return CriuError(message, cmd=cmd, returncode=returncode, stderr=stderr, log_path=log_path)
