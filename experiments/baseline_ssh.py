"""rsync over ssh between two fog nodes, as the paper's scripts moved checkpoint images.

An sshd of its own runs in the destination node's namespace on a chosen port, with a host key
and a client key made for one run in a temporary directory; rsync runs in the source node's
namespace with ``-a`` (no ``-z``) over ``ssh -F`` with a client config that trusts that one
host without checking its key. The command lines and the parsing of rsync's byte counts are
pure functions, unit-tested without root.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fogmig.platform.base.errors import RuntimeToolError, SetupError
from fogmig.platform.base.proc import in_netns, run, terminate

SSHD: Final = "/usr/sbin/sshd"
HOST_ALIAS: Final = "fogmig-baseline-destination"
"""The name the client config gives the destination: its options apply to it alone."""
SSHD_PRIVSEP_DIR: Final = Path("/run/sshd")
READY_LINE: Final = "Server listening on"
_SENT = re.compile(r"^Total bytes sent:\s*([0-9][0-9,.]*)", re.MULTILINE)


def sshd_config(*, directory: Path, address: str, port: int) -> str:
    """The sshd configuration: key login for root only, nothing read from the system's files."""
    return "".join(
        f"{line}\n"
        for line in (
            f"Port {port}",
            f"ListenAddress {address}",
            f"HostKey {directory / 'host_ed25519'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            # The PID we end it by is our own child's; no file is needed.
            "PidFile none",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The key files live in a temporary directory, not in a home directory.
            "StrictModes no",
            "PrintMotd no",
            "Compression no",
        )
    )


def ssh_client_config(*, directory: Path, address: str, port: int) -> str:
    """The client configuration: one host entry, host key not checked for it alone."""
    return "".join(
        f"{line}\n"
        for line in (
            f"Host {HOST_ALIAS}",
            f"    HostName {address}",
            f"    Port {port}",
            "    User root",
            f"    IdentityFile {directory / 'client_ed25519'}",
            "    IdentitiesOnly yes",
            "    StrictHostKeyChecking no",
            "    UserKnownHostsFile /dev/null",
            "    BatchMode yes",
            "    Compression no",
            "    LogLevel ERROR",
        )
    )


def keygen_argv(path: Path, comment: str) -> list[str]:
    return ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]


def sshd_argv(config: Path) -> list[str]:
    # -D: stay in the foreground, so the child we started is sshd itself.
    return [SSHD, "-D", "-f", str(config)]


def ssh_command(client_config: Path) -> str:
    """rsync's remote shell (``-e``)."""
    return f"ssh -F {client_config}"


def rsync_argv(source_dir: Path, dest_dir: Path, client_config: Path) -> list[str]:
    """Copy the contents of ``source_dir`` into ``dest_dir`` at the destination.

    ``-a`` keeps symlinks (a dump's ``parent`` link), no ``-z``: the paper switched
    compression off so that results do not depend on how compressible the memory is.
    """
    return [
        "rsync",
        "-a",
        "--stats",
        "-e",
        ssh_command(client_config),
        f"{source_dir}/",
        f"{HOST_ALIAS}:{dest_dir}/",
    ]


def bytes_sent(stats: str) -> int:
    """The "Total bytes sent" of ``rsync --stats`` (digit grouping with , or . allowed)."""
    found = _SENT.search(stats)
    if found is None:
        raise ValueError("no 'Total bytes sent' line in rsync's output")
    return int(found.group(1).replace(",", "").replace(".", ""))


@dataclass(frozen=True, slots=True)
class RsyncResult:
    seconds: float
    bytes_sent: int


@dataclass(slots=True)
class SshLink:
    """An sshd in the destination's namespace and the keys to reach it from the source.

    ``async with SshLink(...) as link`` makes the keys, starts sshd and waits until it
    listens; leaving ends sshd by its PID and deletes the directory with the keys.
    """

    source_netns: str
    dest_netns: str
    dest_address: str
    port: int
    start_timeout_s: float = 10.0
    directory: Path = field(init=False)
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False)

    @property
    def client_config(self) -> Path:
        return self.directory / "ssh_config"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def __aenter__(self) -> SshLink:
        if shutil.which(SSHD) is None and not Path(SSHD).exists():
            raise SetupError(
                f"{SSHD} not found: the baseline needs an ssh server",
                hint="run `make setup` (it installs openssh-server)",
            )
        self.directory = Path(tempfile.mkdtemp(prefix="fogmig-baseline-ssh-"))
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        d = self.directory
        await run(keygen_argv(d / "host_ed25519", "fogmig-baseline-host"), what="ssh-keygen")
        await run(keygen_argv(d / "client_ed25519", "fogmig-baseline-client"), what="ssh-keygen")
        (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
        (d / "sshd_config").write_text(
            sshd_config(directory=d, address=self.dest_address, port=self.port)
        )
        self.client_config.write_text(
            ssh_client_config(directory=d, address=self.dest_address, port=self.port)
        )
        SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        log = d / "sshd.log"
        argv = in_netns(self.dest_netns, [*sshd_argv(d / "sshd_config"), "-E", str(log)])
        self._proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.start_timeout_s
        while READY_LINE not in (log.read_text(errors="replace") if log.exists() else ""):
            if self._proc.returncode is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace") if log.exists() else ""
                raise RuntimeToolError(
                    f"sshd did not start in {self.dest_netns} on port {self.port}",
                    cmd=argv,
                    returncode=self._proc.returncode,
                    stderr=text,
                    log_path=log,
                )
            await asyncio.sleep(0.05)

    async def rsync(self, source_dir: Path, dest_dir: Path, *, timeout: float) -> RsyncResult:
        """Copy a directory to the destination; the wall time and the bytes rsync sent."""
        t0 = time.monotonic()
        done = await run(
            rsync_argv(source_dir, dest_dir, self.client_config),
            netns=self.source_netns,
            timeout=timeout,
            what=f"rsync of {source_dir}",
        )
        seconds = time.monotonic() - t0
        return RsyncResult(seconds, bytes_sent(done.stdout))

    async def remote(self, argv: Sequence[str], *, timeout: float = 30.0) -> str:
        """Run a command at the destination over ssh (what a script would do there)."""
        done = await run(
            ["ssh", "-F", str(self.client_config), HOST_ALIAS, "--", *argv],
            netns=self.source_netns,
            timeout=timeout,
            what=f"ssh {argv[0]}",
        )
        return done.stdout

    async def close(self) -> None:
        if self._proc is not None:
            await terminate(self._proc, grace=3.0)
            self._proc = None
        if getattr(self, "directory", None) is not None and self.directory.exists():
            shutil.rmtree(self.directory)
