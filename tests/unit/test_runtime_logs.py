"""Reading CRIU's logs: the errors worth reporting and the verdict on a lazy transfer."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogmig.platform.base.errors import CriuError
from fogmig.platform.runtime.node import (
    criu_log_errors,
    criu_log_seconds,
    judge_lazy,
    uffd_transfers,
)

RESTORE_LOG = """\
(00.000000) Version: 4.2.1 (gitid 0)
(00.046519) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: EPERM
(00.050000) Parsing config file /var/lib/fogmig/nodes/gw2/bundles/sensor/restore.conf
(00.061000) Error (criu/image.c:512): Unable to open pstree.img: No such file or directory
(00.061100) Error (criu/cr-restore.c:2400): Restoring FAILED.
"""

LAZY_OK = """\
(00.100000) lazy-pages: Connecting to page server at 10.79.0.1:27000
(01.200000) uffd: 1: UFFD transferred pages: (5611/5611)
(01.200100) uffd: 17: UFFD transferred pages: (12/12)
(01.300000) lazy-pages: The daemon is finished
"""

LAZY_CUT = """\
(00.100000) uffd: 1: UFFD transferred pages: (761/5274)
(00.200000) Error (criu/uffd.c:1100): uffd: 1: Failed to read pages
"""

LOG = Path("/var/lib/fogmig/x/lazy-pages.log")


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


def test_uffd_transfers_one_per_task() -> None:
    assert uffd_transfers(LAZY_OK) == [(5611, 5611), (12, 12)]


def test_lazy_ok_needs_exit_zero_and_every_page() -> None:
    good = judge_lazy(LAZY_OK, 0, 1.3, LOG)
    assert good.ok
    assert (good.pages_transferred, good.pages_total) == (5623, 5623)

    # The daemon's exit code alone is not enough, and neither is the log alone.
    assert not judge_lazy(LAZY_OK, 1, 1.3, LOG).ok
    assert not judge_lazy(LAZY_CUT, 0, 0.2, LOG).ok
    assert not judge_lazy("(00.1) lazy-pages: nothing\n", 0, 0.1, LOG).ok

    cut = judge_lazy(LAZY_CUT, 1, 0.2, LOG)
    assert (cut.pages_transferred, cut.pages_total) == (761, 5274)


def test_lazy_check_raises_naming_the_log() -> None:
    cut = judge_lazy(LAZY_CUT, 1, 0.2, LOG)
    with pytest.raises(CriuError, match="761/5274") as info:
        cut.check()
    assert info.value.log_path == LOG
    assert str(LOG) in str(info.value)
    judge_lazy(LAZY_OK, 0, 1.3, LOG).check()


def test_duration_comes_from_the_daemons_own_clock() -> None:
    assert criu_log_seconds(LAZY_OK) == 1.3
    assert criu_log_seconds("no timestamps here\n") is None
    # However late the caller looks, the daemon's last log line says when it finished.
    assert judge_lazy(LAZY_OK, 0, 99.0, LOG).duration == 1.3
    assert judge_lazy("plain\n", 0, 2.5, LOG).duration == 2.5
