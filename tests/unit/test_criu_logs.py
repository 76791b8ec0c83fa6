"""Reading CRIU's logs: the errors worth reporting."""

from __future__ import annotations

from fogmig.platform.runtime.criu_logs import criu_log_errors

RESTORE_LOG = """\
(00.000000) Version: 4.2.1 (gitid 0)
(00.046519) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: EPERM
(00.050000) Parsing config file /var/lib/fogmig/nodes/gw2/bundles/sensor/restore.conf
(00.061000) Error (criu/image.c:512): Unable to open pstree.img: No such file or directory
(00.061100) Error (criu/cr-restore.c:2400): Restoring FAILED.
"""


def test_errors_skip_the_harmless_rlimit_line_and_timestamps() -> None:
    errors = criu_log_errors(RESTORE_LOG)
    assert errors == [
        "Error (criu/image.c:512): Unable to open pstree.img: No such file or directory",
        "Error (criu/cr-restore.c:2400): Restoring FAILED.",
    ]
    assert criu_log_errors(RESTORE_LOG, limit=1) == [
        "Error (criu/cr-restore.c:2400): Restoring FAILED."
    ]
    assert criu_log_errors("") == []
