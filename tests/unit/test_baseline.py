"""The baseline's command lines (runc, criu, rsync, ssh) and its reading of their output."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from fogmig.experiments import baseline_cmds as cmds
from fogmig.experiments import baseline_ssh as ssh
from fogmig.experiments.baseline import ENGINE, engine_of, new_migration_id
from fogmig.experiments.baseline_compare import compare, markdown
from fogmig.platform.base.vocabulary import PAGE_SIZE, Outcome, Technique
from fogmig.platform.cli.baseline import technique
from fogmig.platform.cli.main import build_parser
from fogmig.platform.migration.record import MigrationRecord

ROOT = Path("/run/fogmig/nodes/gw1/runc")
IMG = Path("/img/final")
WORK = Path("/srv/work")


def test_cold_checkpoint_is_a_plain_runc_checkpoint() -> None:
    argv = cmds.checkpoint_argv(ROOT, "bench", image_dir=IMG, work_dir=WORK)
    assert argv == [
        *("runc", "--root", str(ROOT), "--criu", "criu", "checkpoint"),
        *("--image-path", str(IMG), "--work-path", str(WORK), "bench"),
    ]


def test_pre_dump_and_final_dump_with_parent() -> None:
    pre = cmds.checkpoint_argv(ROOT, "bench", image_dir=IMG, work_dir=WORK, pre_dump=True)
    assert "--pre-dump" in pre
    assert "--parent-path" not in pre
    final = cmds.checkpoint_argv(ROOT, "bench", image_dir=IMG, work_dir=WORK, parent="../pre")
    assert final[final.index("--parent-path") + 1] == "../pre"
    assert "--pre-dump" not in final
    assert final[-1] == "bench"


def test_parent_link_points_from_final_to_pre_dump() -> None:
    layout = cmds.ImageLayout(Path("/x"))
    assert (layout.final / cmds.PARENT_LINK).resolve() == layout.pre_dump


def test_lazy_checkpoint_runs_a_page_server_and_reports_on_its_status_fd() -> None:
    argv = cmds.checkpoint_argv(
        ROOT, "bench", image_dir=IMG, work_dir=WORK, page_server=("10.0.0.1", 27027), status_fd=7
    )
    assert argv[argv.index("--page-server") + 1] == "10.0.0.1:27027"
    assert "--lazy-pages" in argv
    assert argv[argv.index("--status-fd") + 1] == "7"
    assert argv[-1] == "bench"


def test_restore_is_detached_and_lazy_only_when_asked() -> None:
    full = cmds.restore_argv(ROOT, "bench", bundle=Path("/b"), image_dir=IMG, work_dir=WORK)
    assert full[5:7] == ["restore", "--detach"]
    assert full[full.index("--bundle") + 1] == "/b"
    assert "--lazy-pages" not in full
    lazy = cmds.restore_argv(
        ROOT, "bench", bundle=Path("/b"), image_dir=IMG, work_dir=WORK, lazy=True
    )
    assert "--lazy-pages" in lazy
    assert lazy[-1] == "bench"


def test_lazy_pages_daemon_connects_to_the_source_page_server() -> None:
    argv = cmds.lazy_pages_argv(address="10.0.0.1", port=27027, image_dir=IMG, work_dir=WORK)
    assert argv[:3] == ["criu", "lazy-pages", "--page-server"]
    assert argv[argv.index("--address") + 1] == "10.0.0.1"
    assert argv[argv.index("--port") + 1] == "27027"
    assert argv[argv.index("--work-dir") + 1] == str(WORK)


def test_uffd_pages_sums_every_task() -> None:
    log = (
        "(00.1) uffd: 1: UFFD transferred pages: (100/100)\n"
        "(00.2) uffd: 7: UFFD transferred pages: (20/25)\n"
    )
    assert cmds.uffd_pages(log) == (120, 125)
    assert cmds.uffd_bytes(log) == 120 * PAGE_SIZE
    assert cmds.uffd_pages("nothing here") == (0, 0)


def test_rsync_is_archive_mode_without_compression_over_our_ssh_config() -> None:
    argv = ssh.rsync_argv(Path("/src/images"), Path("/dst/images"), Path("/tmp/k/ssh_config"))
    assert argv[:3] == ["rsync", "-a", "--stats"]
    assert not any(a in ("-z", "--compress") or (a.startswith("-") and "z" in a) for a in argv)
    assert argv[argv.index("-e") + 1] == "ssh -F /tmp/k/ssh_config"
    assert argv[-2:] == ["/src/images/", f"{ssh.HOST_ALIAS}:/dst/images/"]


def test_host_key_checking_is_off_for_the_destination_alone() -> None:
    text = ssh.ssh_client_config(directory=Path("/tmp/k"), address="10.0.0.2", port=2222)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == f"Host {ssh.HOST_ALIAS}"
    assert [line for line in lines if line.startswith("Host ")] == [lines[0]]
    assert "StrictHostKeyChecking no" in lines
    assert "HostName 10.0.0.2" in lines
    assert "Port 2222" in lines
    assert "IdentityFile /tmp/k/client_ed25519" in lines


def test_sshd_takes_keys_only_and_listens_where_asked() -> None:
    text = ssh.sshd_config(directory=Path("/tmp/k"), address="10.0.0.2", port=2222)
    lines = text.splitlines()
    assert "Port 2222" in lines
    assert "ListenAddress 10.0.0.2" in lines
    assert "PasswordAuthentication no" in lines
    assert "AuthorizedKeysFile /tmp/k/authorized_keys" in lines
    assert ssh.sshd_argv(Path("/tmp/k/sshd_config"))[:2] == [ssh.SSHD, "-D"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Total bytes sent: 108", 108),
        ("Total bytes sent: 94,190,076", 94_190_076),
        ("Total bytes sent: 94.190.076", 94_190_076),
    ],
)
def test_bytes_sent_reads_the_stats_line(line: str, expected: int) -> None:
    stats = f"Number of files: 3\nTotal file size: 1,000 bytes\n{line}\nTotal bytes received: 35\n"
    assert ssh.bytes_sent(stats) == expected


def test_bytes_sent_refuses_output_without_stats() -> None:
    with pytest.raises(ValueError, match="Total bytes sent"):
        ssh.bytes_sent("sent 108 bytes  received 35 bytes")


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_bytes_sent_of_a_real_local_rsync(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "pages-1.img").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    done = subprocess.run(
        ["rsync", "-a", "--stats", "--whole-file", f"{src}/", f"{dst}/"],
        capture_output=True,
        text=True,
        check=True,
    )
    sent = ssh.bytes_sent(done.stdout)
    assert 1 << 20 <= sent < (1 << 20) + 4096


def test_cli_technique_names() -> None:
    assert technique("pre-copy") is Technique.PRECOPY
    assert technique("post-copy") is Technique.POSTCOPY
    assert technique("hybrid") is Technique.HYBRID
    assert technique("cold") is Technique.COLD
    assert technique("precopy") is Technique.PRECOPY
    with pytest.raises(argparse.ArgumentTypeError):
        technique("warm")


def test_cli_is_registered() -> None:
    args = build_parser().parse_args(["baseline", "--technique", "pre-copy", "--state-mb", "8"])
    assert args.technique is Technique.PRECOPY
    assert args.state_mb == 8
    assert args.profile == "orchestration"


def test_engine_column_follows_the_id_prefix() -> None:
    mid = new_migration_id("bench")
    assert mid.startswith("baseline-bench-")

    def record(migration_id: str) -> MigrationRecord:
        return MigrationRecord(
            migration_id=migration_id,
            service="bench",
            source="gw1",
            destination="gw2",
            technique=Technique.COLD,
        )

    assert engine_of(record(mid)) == ENGINE == "runc-rsync"
    assert engine_of(record("bench-20261207T121455-c0843f")) == "fogmig"


def _rec(mid: str, technique: Technique, total: float, *, ok: bool = True) -> MigrationRecord:
    return MigrationRecord(
        migration_id=mid,
        service="bench",
        source="gw1",
        destination="gw2",
        technique=technique,
        outcome=Outcome.COMPLETED if ok else Outcome.ROLLED_BACK,
        error=None if ok else "runc checkpoint --pre-dump failed: CRIU is missing features",
        dump_time_s=total / 2,
        dump_transfer_time_s=total / 2,
        dump_bytes=int(total * 1e6),
    )


def test_compare_gives_fogmig_over_baseline_ratios_and_the_baseline_failure() -> None:
    records = [
        _rec("bench-1", Technique.COLD, 10.0),
        _rec("bench-2", Technique.COLD, 12.0),
        _rec("baseline-bench-1", Technique.COLD, 22.0),
        _rec("bench-3", Technique.PRECOPY, 14.0),
        _rec("baseline-bench-2", Technique.PRECOPY, 0.0, ok=False),
    ]
    rows = {c.technique: c for c in compare(records)}
    cold = rows[Technique.COLD]
    assert cold.ratio("total_s") == pytest.approx(0.5)
    assert cold.ratio("bytes") == pytest.approx(0.5)
    pre = rows[Technique.PRECOPY]
    assert pre.baseline is None
    assert pre.ratio("total_s") is None
    assert pre.baseline_error is not None
    assert "missing features" in pre.baseline_error
    assert Technique.HYBRID not in rows
    table = markdown(list(rows.values()))
    assert "| cold | 11.00 | 22.00 | 0.50 |" in table
