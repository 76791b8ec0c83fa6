"""The runtime with real runc, CRIU and network namespaces, on the real service image.

Two test nodes (namespaces joined by a veth pair) run the sensor service with a few MB of
state; readings go in through libcoap's ``coap-client`` and the state is read back through the
project's client, so every dump and restore is checked by what the service remembers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fogmig.platform.base.errors import (
    ContainerNotFoundError,
    CriuError,
    ServiceError,
    UnknownNodeError,
)
from fogmig.platform.base.mounts import mounts_below
from fogmig.platform.runtime.bundle import make_bundle
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.runtime.workdir import remove_tree
from fogmig.services.client import ServiceState, encode_reading
from fogmig.services.deploy import (
    ServiceSpec,
    deploy,
    find_service,
    node_runtime,
    probe_state,
    wait_for_service,
)
from fogmig.services.image import ensure_image, find_image
from fogmig.services.sensor import INITIAL_HASH, chain_hash

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc, CRIU and namespaces need root"),
]

STATE_MB = 6
PORT = 5683
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def _sh(*argv: str, netns: str | None = None, check: bool = True) -> str:
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}", "--"] if netns else []
    done = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr}")
    return done.stdout


def _coap_client() -> str:
    for name in ("coap-client", "coap-client-notls", "coap-client-gnutls", "coap-client-openssl"):
        if shutil.which(name):
            return name
    pytest.fail("libcoap's coap-client is not installed (libcoap3-bin)")


@dataclass
class Net:
    """Two test nodes: namespaces ``a`` and ``b`` joined by a veth pair."""

    a: str
    b: str
    a_ip: str = "10.231.0.1"
    b_ip: str = "10.231.0.2"


@pytest.fixture(scope="module")
def image() -> Path:
    found = find_image()
    return found if found is not None else asyncio.run(ensure_image())


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    n = Net(a=f"fmrt-{tag}a", b=f"fmrt-{tag}b")
    veth_a, veth_b = f"fmrt{tag}a", f"fmrt{tag}b"
    try:
        for ns in (n.a, n.b):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _sh("ip", "link", "set", veth_a, "netns", n.a)
        _sh("ip", "link", "set", veth_b, "netns", n.b)
        _sh("ip", "-n", n.a, "addr", "add", f"{n.a_ip}/24", "dev", veth_a)
        _sh("ip", "-n", n.b, "addr", "add", f"{n.b_ip}/24", "dev", veth_b)
        _sh("ip", "-n", n.a, "link", "set", veth_a, "up")
        _sh("ip", "-n", n.b, "link", "set", veth_b, "up")
        yield n
    finally:
        for ns in (n.a, n.b):
            _sh("ip", "netns", "del", ns, check=False)
    left = _sh("ip", "netns", "list")
    assert n.a not in left
    assert n.b not in left


@dataclass
class Nodes:
    net: Net
    root: Path
    image: Path
    a: NodeRuntime
    b: NodeRuntime
    ledger: list[bytes] = field(default_factory=list)

    def bundle(self, node: NodeRuntime, cid: str) -> Path:
        assert node.netns is not None
        return make_bundle(
            self.root / "bundles" / f"{node.node}-{cid}",
            rootfs=self.image,
            args=ServiceSpec(name=cid, state_mb=STATE_MB, dirty_kbps=20).args(),
            netns_path=Path("/var/run/netns") / node.netns,
            restore_conf=True,
            cgroups_path=f"/fogmig-test/{node.netns}/{cid}",
            hostname=cid,
        )

    def dirs(self, name: str) -> tuple[Path, Path]:
        return self.root / name / "images", self.root / name / "work"

    def post(self, node: NodeRuntime, device: str = "dev1") -> str:
        """POST the next reading with libcoap's client; remember it for the expected hash."""
        payload = encode_reading({"device": device, "seq": len(self.ledger) + 1, "t": 21.5})
        out = _sh(
            _coap_client(),
            "-m",
            "post",
            "-t",
            "50",
            "-B",
            "5",
            "-e",
            payload.decode(),
            f"coap://127.0.0.1:{PORT}/sensor",
            netns=node.netns,
        )
        assert '"applied":true' in out, out
        self.ledger.append(payload)
        return out

    def expected(self, upto: int | None = None) -> tuple[int, str]:
        h = INITIAL_HASH
        readings = self.ledger if upto is None else self.ledger[:upto]
        for payload in readings:
            h = chain_hash(h, payload)
        return len(readings), h

    async def start(self, node: NodeRuntime, cid: str) -> ServiceState:
        await node.run(cid, self.bundle(node, cid))
        return await wait_for_service(node, cid, port=PORT, timeout=30)


def _mounts(path: Path) -> list[Path]:
    return mounts_below(path)


def _iptables(netns: str) -> str:
    return _sh("iptables", "-w", "-S", netns=netns)


@pytest.fixture
async def nodes(net: Net, image: Path, tmp_path: Path) -> AsyncIterator[Nodes]:
    n = Nodes(
        net=net,
        root=tmp_path,
        image=image,
        a=NodeRuntime(node="fmrta", netns=net.a, runc_root=tmp_path / "runc-a"),
        b=NodeRuntime(node="fmrtb", netns=net.b, runc_root=tmp_path / "runc-b"),
    )
    try:
        yield n
    finally:
        # Tests may leave their containers running; the runtime must be able to remove them.
        for rt in (n.a, n.b):
            for c in await rt.list():
                await rt.delete(c.id, force=True)
        left = [c.id for rt in (n.a, n.b) for c in await rt.list()]
        mounted = _mounts(tmp_path)
        remove_tree(tmp_path)
    # Checked after the clean-up so that one failure does not leak into the next test.
    assert left == []
    assert mounted == [], f"mounts left below the test directory: {mounted}"
    for ns in (net.a, net.b):
        rules = _iptables(ns)
        assert "CRIU" not in rules, rules
        assert not (CGROUP_MEMORY / "fogmig-test" / ns).exists(), "cgroup left behind"


def _assert_state(state: ServiceState, expected: tuple[int, str]) -> None:
    assert (state.count, state.hash) == expected


async def test_run_answers_and_stops(nodes: Nodes) -> None:
    first = await nodes.start(nodes.a, "svc")
    assert first.count == 0
    assert first.state_mb == STATE_MB
    nodes.post(nodes.a)
    nodes.post(nodes.a)
    _assert_state(await probe_state(nodes.net.a), nodes.expected())

    st = await nodes.a.state("svc")
    assert st.running
    assert st.pid > 0
    assert [c.id for c in await nodes.a.list()] == ["svc"]
    assert await nodes.b.list() == []

    await nodes.a.stop("svc", grace=5)
    with pytest.raises(ContainerNotFoundError):
        await nodes.a.state("svc")


async def test_full_checkpoint_and_restore_keep_the_state(nodes: Nodes) -> None:
    await nodes.start(nodes.a, "svc")
    for _ in range(3):
        nodes.post(nodes.a)
    images, work = nodes.dirs("full")

    ck = await nodes.a.checkpoint("svc", image_dir=images, work_dir=work)

    assert ck.pages_written is not None
    assert ck.pages_written > STATE_MB * 256  # the state alone is STATE_MB MiB of pages
    assert ck.frozen_ms is not None
    assert ck.frozen_ms > 0
    assert ck.image_bytes > STATE_MB << 20
    assert (work / "dump.log").exists()
    assert not await nodes.a.exists("svc")  # a dump without leave-running ends the container
    assert "CRIU" not in _iptables(nodes.net.a)

    rs = await nodes.a.restore(
        "svc", bundle=nodes.bundle(nodes.a, "svc"), image_dir=images, work_dir=nodes.dirs("r")[1]
    )

    assert rs.pid > 0
    assert rs.pages_restored == ck.pages_written
    _assert_state(await probe_state(nodes.net.a), nodes.expected())
    nodes.post(nodes.a)  # the running hash goes on from where it was
    _assert_state(await probe_state(nodes.net.a), nodes.expected())
    # A restored container dumps again (its bundle's restore-only options are kept aside).
    again = await nodes.a.checkpoint(
        "svc", image_dir=nodes.dirs("again")[0], work_dir=nodes.dirs("again")[1]
    )
    assert again.pages_written
    assert (nodes.bundle(nodes.a, "svc") / "restore.conf").exists()
    print(
        f"\n{STATE_MB} MB: checkpoint {ck.wall_s:.3f} s (frozen {ck.frozen_ms:.1f} ms), "
        f"restore {rs.wall_s:.3f} s (CRIU {rs.restore_ms} ms)"
    )


async def test_leave_running_keeps_the_original_and_the_image_clones(nodes: Nodes) -> None:
    await nodes.start(nodes.a, "svc")
    nodes.post(nodes.a)
    nodes.post(nodes.a)
    images, work = nodes.dirs("lr")

    ck = await nodes.a.checkpoint("svc", image_dir=images, work_dir=work, leave_running=True)

    assert ck.leave_running
    assert ck.frozen_ms is not None
    assert 0 < ck.frozen_ms < 5000
    assert (await nodes.a.state("svc")).running
    _assert_state(await probe_state(nodes.net.a), nodes.expected())
    nodes.post(nodes.a)
    _assert_state(await probe_state(nodes.net.a), nodes.expected())

    # The image holds the state of the moment of the dump: restore it as a clone on node b.
    await nodes.b.restore(
        "svc", bundle=nodes.bundle(nodes.b, "svc"), image_dir=images, work_dir=nodes.dirs("c")[1]
    )
    _assert_state(await probe_state(nodes.net.b), nodes.expected(upto=2))
    _assert_state(await probe_state(nodes.net.a), nodes.expected())
    print(f"\nleave-running freeze {ck.frozen_ms:.1f} ms, wall {ck.wall_s:.3f} s")


async def test_failed_restore_names_its_log_and_leaves_nothing(nodes: Nodes) -> None:
    await nodes.start(nodes.a, "svc")
    images, work = nodes.dirs("bad")
    await nodes.a.checkpoint("svc", image_dir=images, work_dir=work)
    core = next(images.glob("core-*.img"))
    core.write_bytes(core.read_bytes()[: core.stat().st_size // 2])
    restore_work = nodes.dirs("bad-restore")[1]

    with pytest.raises(CriuError) as info:
        await nodes.a.restore(
            "svc", bundle=nodes.bundle(nodes.a, "svc"), image_dir=images, work_dir=restore_work
        )

    err = info.value
    assert err.log_path == restore_work / "restore.log"
    assert err.log_path.exists()
    assert str(err.log_path) in str(err)
    assert "Error (" in str(err)  # CRIU's own explanation, not only runc's
    assert "RLIMIT_NOFILE" not in str(err)
    assert _mounts(restore_work) == []
    assert not await nodes.a.exists("svc")


async def test_restore_refuses_an_existing_name(nodes: Nodes) -> None:
    await nodes.start(nodes.a, "svc")
    images, work = nodes.dirs("dup")
    await nodes.a.checkpoint("svc", image_dir=images, work_dir=work, leave_running=True)
    with pytest.raises(Exception, match="exists"):
        await nodes.a.restore(
            "svc", bundle=nodes.bundle(nodes.a, "svc"), image_dir=images, work_dir=work
        )
    assert (await nodes.a.state("svc")).running


async def test_a_left_network_lock_is_removed(nodes: Nodes) -> None:
    ns = nodes.net.a
    # What a dump that locked the node and then died would leave behind.
    _sh("iptables", "-w", "-N", "CRIU", netns=ns)
    _sh("iptables", "-w", "-A", "CRIU", "-j", "DROP", netns=ns)
    _sh("iptables", "-w", "-I", "INPUT", "-j", "CRIU", netns=ns)
    _sh("iptables", "-w", "-I", "OUTPUT", "-j", "CRIU", netns=ns)

    assert await nodes.a.remove_network_lock()

    assert "CRIU" not in _iptables(ns)
    assert not await nodes.a.remove_network_lock()


def test_remove_tree_unmounts_before_deleting(tmp_path: Path) -> None:
    work = tmp_path / "work"
    yard = work / ".criu.cgyard.test"
    yard.mkdir(parents=True)
    (work / "restore.log").write_text("log")
    _sh("mount", "-t", "tmpfs", "fmrt-yard", str(yard))
    (yard / "inner").mkdir()
    _sh("mount", "-t", "tmpfs", "fmrt-inner", str(yard / "inner"))
    (yard / "inner" / "file").write_text("on another filesystem")
    try:
        remove_tree(work)
    finally:
        for point in _mounts(tmp_path):
            _sh("umount", "-l", str(point), check=False)
    assert not work.exists()
    assert _mounts(tmp_path) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys\nfrom fogmig.platform.cli.main import main\nsys.exit(main())\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONSAFEPATH="1"),
    )


async def test_deploy_refuses_second_copies_and_undeploys(
    net: Net, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    del image  # built (or found) by the fixture; deploy looks it up itself
    monkeypatch.setenv("FOGMIG_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("FOGMIG_STATE_DIR", str(tmp_path / "state"))
    spec = ServiceSpec(name="fmrt-svc", state_mb=4)
    try:
        d = await deploy(spec, node="fmrta", netns=net.a, timeout=30)
        assert (d.node, d.netns, d.port) == ("fmrta", net.a, PORT)
        assert net.a_ip in d.addresses
        assert d.state.count == 0
        assert d.state.state_mb == 4
        assert d.bundle == tmp_path / "state" / "nodes" / "fmrta" / "bundles" / "fmrt-svc"

        # The same service on another node, or another service on the same node and port,
        # would silently share the requests with the first.
        with pytest.raises(ServiceError, match="already runs on node fmrta"):
            await deploy(spec, node="fmrtb", netns=net.b, timeout=30)
        with pytest.raises(ServiceError, match=f"port {PORT}"):
            await deploy(ServiceSpec(name="fmrt-other", state_mb=4), node="fmrta", netns=net.a)
        with pytest.raises(UnknownNodeError, match="fm-fmrtnone"):
            await deploy(spec, node="fmrtnone")
        assert [(p.node, p.name, p.live) for p in await find_service("fmrt-svc")] == [
            ("fmrta", "fmrt-svc", True)
        ]

        listed = _cli("services", "--json")
        assert listed.returncode == 0, listed.stderr
        assert '"name": "fmrt-svc"' in listed.stdout
        assert '"status": "running"' in listed.stdout

        removed = _cli("undeploy", "fmrt-svc")
        assert removed.returncode == 0, removed.stderr
        assert "fmrta" in removed.stdout
        assert await find_service("fmrt-svc") == []
        assert not d.bundle.exists()
        again = _cli("undeploy", "fmrt-svc")
        assert again.returncode == 1
        assert "no service fmrt-svc" in again.stderr
    finally:
        for node in ("fmrta", "fmrtb"):
            rt = node_runtime(node, netns=net.a if node == "fmrta" else net.b)
            for c in await rt.list():
                await rt.delete(c.id, force=True)
