"""The platform's self-check: everything it relies on, each with the consequence when missing.

:func:`run_checks` returns one :class:`Check` per tool, kernel feature and setting (ok, note or
fail); :func:`can_run` says whether the platform can run on this machine. ``fogmig doctor``
prints them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Literal

from fogmig.platform.runtime import capabilities as caps

Status = Literal["ok", "note", "fail"]


@dataclass(frozen=True, slots=True)
class Check:
    """One row of the doctor's report: what was checked, and ok / note (a limit) / fail."""

    name: str
    status: Status
    detail: str


def _tool(name: str, purpose: str, *alternatives: str) -> Check:
    path = next((p for n in (name, *alternatives) if (p := shutil.which(n))), None)
    if path is None:
        return Check(name, "fail", f"not found: needed for {purpose} (run `make setup`)")
    return Check(name, "ok", path)


def run_checks() -> list[Check]:
    """Check every tool, kernel feature and setting the platform relies on."""
    checks: list[Check] = []
    is_root = os.geteuid() == 0
    checks.append(
        Check(
            "root",
            "ok" if is_root else "fail",
            "running as root" if is_root else "runc, CRIU and namespaces need root",
        )
    )
    c = caps.criu_capabilities()
    if c.path is None:
        checks.append(Check("criu", "fail", "not found (run `make setup` to build 4.2.1)"))
    elif not c.version_ok:
        checks.append(
            Check(
                "criu",
                "fail",
                f"{c.version} at {c.path} is too old: >= 4.2 is needed to dump UDP sockets "
                "on this kernel (run `make setup`)",
            )
        )
    else:
        checks.append(Check("criu", "ok", f"{c.version} at {c.path}"))
    checks.append(
        Check(
            "criu check",
            "ok" if c.check_ok else "fail",
            "looks good" if c.check_ok else c.check_message or "failed",
        )
    )
    checks.append(
        Check(
            "uffd-noncoop",
            "ok" if c.uffd_noncoop else "note",
            "post-copy and hybrid available (lazy restore over userfaultfd)"
            if c.uffd_noncoop
            else "absent: post-copy and hybrid are unavailable; cold and pre-copy still work",
        )
    )
    checks.append(
        Check(
            "mem_dirty_track",
            "ok" if c.mem_dirty_track else "note",
            "soft-dirty tracking: CRIU's native pre-dump may be used"
            if c.mem_dirty_track
            else "absent (no soft-dirty in this kernel): pre-copy will use the page-delta path",
        )
    )
    rv = caps.runc_version()
    checks.append(Check("runc", "ok" if rv else "fail", rv or "not found (run `make setup`)"))
    netem = caps.has_netem() if is_root else False
    checks.append(
        Check(
            "netem",
            "ok" if netem else "note",
            "tc netem shapes the testbed's links"
            if netem
            else "absent in this kernel: the testbed uses its userspace TUN link emulator",
        )
    )
    sysctls = caps.pipe_sysctls()
    checks.append(
        Check(
            "pipe sysctls",
            "ok" if caps.pipe_sysctls_ok() else "fail",
            ", ".join(f"{k}={v}" for k, v in sysctls.items())
            + (
                ""
                if caps.pipe_sysctls_ok()
                else ": the lazy page server needs "
                "pipe-max-size>=8388608 and pipe-user-pages-soft=0 (run `make setup`)"
            ),
        )
    )
    checks.append(_tool("mosquitto", "the MQTT bus"))
    for name, purpose in (
        ("nsenter", "entering a node's network namespace"),
        ("ip", "the testbed's namespaces and links"),
        ("iptables", "CRIU's network lock and the page server firewall"),
        ("iperf3", "measuring link throughput"),
    ):
        checks.append(_tool(name, purpose))
    # Debian 12 ships libcoap's client only under its TLS back-end's name.
    checks.append(
        _tool(
            "coap-client",
            "the independent CoAP peer in tests",
            "coap-client-notls",
            "coap-client-gnutls",
            "coap-client-openssl",
        )
    )
    checks.append(_image_check())
    return checks


def _image_check() -> Check:
    from fogmig.services import image

    found = image.find_image()
    if found is None:
        return Check(
            "service image", "fail", "not built (run `make setup` or `fogmig image build`)"
        )
    return Check("service image", "ok", str(found))


def can_run(checks: list[Check]) -> bool:
    """The platform can run here: no check failed (notes only limit what it can do)."""
    return all(c.status != "fail" for c in checks)
