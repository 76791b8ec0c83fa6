"""Transfer channel on loopback: round trips, auth both ways, integrity, confinement, timeouts.

Both ends run mutual TLS 1.3 with certificates of a CA made for the test session. A "raw" peer
built from the codec (over TLS, with a valid certificate) stands in for a misbehaving or
malicious node, so the server's checks are exercised with exactly the bytes an authenticated
attacker could send; proxies between the ends alter, inject or redirect what crosses the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import posixpath
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogmig.platform.base.errors import ConfigError, FogmigError, TransferError
from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import (
    IdentityFiles,
    create_ca,
    identity_files,
    issue,
    save_ca,
    save_identity,
)
from fogmig.platform.security.tls import client_context
from fogmig.platform.transfer.client import TransferClient
from fogmig.platform.transfer.codec import (
    TAG_RAW,
    TAG_ZSTD,
    ChunkCodecError,
    ChunkDecoder,
    ChunkEncoder,
)
from fogmig.platform.transfer.outgoing import ChunkSource
from fogmig.platform.transfer.protection import ChannelSecurity
from fogmig.platform.transfer.server import (
    CallReply,
    TransferServer,
    TransferSession,
    remove_migration_dir,
)
from fogmig.platform.transfer.wire import (
    CHUNK_SIZE,
    FRAME_OF,
    HEADER,
    HEADER_SIZE,
    MESSAGE_OF,
    PARTIAL_SUFFIX,
    PROTOCOL_VERSION,
    AuthError,
    ErrorReply,
    FileAbort,
    FileBegin,
    FileEnd,
    FileOk,
    Frame,
    FrameType,
    Hello,
    IncomingFile,
    IntegrityError,
    NoSpaceError,
    PathError,
    PeerError,
    ProtocolError,
    ReceiverOrder,
    ReceiverState,
    RemoteError,
    TlsError,
    Welcome,
    check_migration_id,
    check_relative_path,
    decode_header,
    decode_message,
    encode_frame,
    encode_header,
    encode_message,
)

MID = "fmtx-m1"

SEC: dict[str, ChannelSecurity] = {}
"""Identities of the session: ``gwa``, ``gwb``, ``gwc`` of the site CA, ``rogue-gwa`` and
``rogue-gwb`` of another CA (filled by the ``identities`` fixture)."""
FILES: dict[str, IdentityFiles] = {}


@pytest.fixture(scope="session", autouse=True)
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ChannelSecurity]:
    """A site CA with three nodes and a device; another CA with two nodes of the same names."""
    base = tmp_path_factory.mktemp("pki")
    for prefix, ca_name, names in (
        ("", "fogmig test site CA", ("gwa", "gwb", "gwc")),
        ("rogue-", "another CA", ("gwa", "gwb")),
    ):
        folder = base / (prefix.rstrip("-") or "site")
        ca = create_ca(name=ca_name)
        save_ca(ca, folder)
        for name in names:
            files = save_identity(issue(ca, Identity.node(name)), folder)
            FILES[prefix + name] = files
            SEC[prefix + name] = ChannelSecurity.from_files(files)
        if not prefix:
            FILES["device"] = save_identity(issue(ca, Identity.device("d1")), folder)
    # Someone who trusts the site CA but presents a certificate of its own CA.
    rogue = FILES["rogue-gwa"]
    FILES["forged-gwa"] = IdentityFiles(
        identity=rogue.identity, cert=rogue.cert, key=rogue.key, ca=FILES["gwa"].ca
    )
    SEC["forged-gwa"] = ChannelSecurity.from_files(FILES["forged-gwa"])
    return SEC


class Handler:
    """Records calls; a few ops that succeed, refuse, crash or take long."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def on_call(
        self, session: TransferSession, op: str, params: dict[str, Any]
    ) -> dict[str, Any] | CallReply:
        self.calls.append((session.peer, op, params))
        if op == "echo":
            return {"params": params, "peer": session.peer, "node": session.node}
        if op == "refuse":
            raise ConfigError("no such service", hint="deploy it first")
        if op == "crash":
            raise RuntimeError("boom")
        if op == "slow":
            await asyncio.sleep(float(params["seconds"]))
            return {"slept": params["seconds"]}
        if op == "pages":
            return CallReply(result={"count": params["count"]}, data=b"\xab" * params["count"])
        if op == "listdir":
            mdir = session.migration_dir(params["migration_id"])
            return {"files": sorted(str(p.relative_to(mdir)) for p in mdir.rglob("*"))}
        raise ConfigError(f"unknown op {op}")


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
def recv_root(tmp_path: Path) -> Path:
    root = tmp_path / "recv"
    root.mkdir()
    return root


ServerFactory = Callable[..., TransferServer]


@pytest.fixture
async def server(recv_root: Path, handler: Handler) -> AsyncIterator[TransferServer]:
    async with TransferServer(
        host="127.0.0.1",
        port=0,
        security=SEC["gwb"],
        root=recv_root,
        handler=handler,
        idle_timeout=2.0,
        keepalive_interval=0.1,
    ) as srv:
        yield srv


def connect(port: int, **kw: Any) -> Any:
    args: dict[str, Any] = {"security": SEC["gwa"], "peer": "gwb", "timeout": 5.0}
    args.update(kw)
    return TransferClient.connect("127.0.0.1", port, **args)


def make_source(base: Path) -> Path:
    src = base / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "inventory.img").write_bytes(b"\x01\x02inventory")
    (src / "empty.img").write_bytes(b"")
    (src / "pages-1.img").write_bytes(os.urandom(3 * CHUNK_SIZE + 17))
    (src / "sub" / "core-1.img").write_bytes(b"core" * 1000)
    (src / "sub" / "deeper" / "zeros.img").write_bytes(bytes(CHUNK_SIZE * 2))
    (src / "sub" / "descriptors.json").write_text('{"a": 1}')
    os.chmod(src / "inventory.img", 0o640)
    return src


# --- raw peer built from the codec -------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader, timeout: float = 5.0) -> Frame:
    async with asyncio.timeout(timeout):
        ftype, size = decode_header(await reader.readexactly(HEADER_SIZE))
        return Frame(ftype, await reader.readexactly(size) if size else b"")


async def raw_tls(
    port: int, context: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection with ``context`` (default: node gwa's) and nothing sent yet."""
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=context or SEC["gwa"].client, limit=2**20
    )


async def raw_session(
    port: int, *, node: str = "gwa", peer: str = "gwb"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A session opened by hand as node gwa: TLS, then HELLO and the server's WELCOME."""
    reader, writer = await raw_tls(port)
    writer.write(encode_message(Hello(version=PROTOCOL_VERSION, node=node, peer=peer)))
    assert decode_message(await read_frame(reader), Welcome).node == peer
    return reader, writer


def file_frames(
    path: str, data: bytes, *, seq: int = 0, sha: str | None = None, size: int | None = None
) -> bytes:
    begin = FileBegin(
        seq=seq, migration_id=MID, path=path, size=len(data) if size is None else size
    )
    out = encode_message(begin)
    for off in range(0, len(data), CHUNK_SIZE):
        out += encode_frame(FrameType.FILE_DATA, data[off : off + CHUNK_SIZE])
    digest = sha or hashlib.sha256(data).hexdigest()
    return out + encode_message(FileEnd(seq=seq, sha256=digest))


async def expect_error(reader: asyncio.StreamReader) -> ErrorReply:
    frame = await read_frame(reader)
    assert frame.type is FrameType.ERROR, frame
    return decode_message(frame, ErrorReply)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the peer has closed (a reset counts: it closed with our data unread)."""
    try:
        async with asyncio.timeout(timeout):
            return await reader.read() == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


# --- round trips --------------------------------------------------------------------------------


async def test_directory_round_trip_is_byte_identical(
    server: TransferServer, recv_root: Path, tmp_path: Path
) -> None:
    src = make_source(tmp_path)
    seen: list[tuple[int, int]] = []
    async with connect(server.port) as ch:
        stats = await ch.send_dir(MID, src, progress=lambda done, total: seen.append((done, total)))
    assert tree(recv_root / MID) == tree(src)
    total = sum(len(v) for v in tree(src).values())
    assert (stats.files, stats.bytes, stats.wire_bytes) == (6, total, total)
    assert stats.seconds > 0
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert (recv_root / MID / "inventory.img").stat().st_mode & 0o777 == 0o640
    assert partials(recv_root) == []


async def test_compression_round_trips_and_shrinks_the_wire(
    server: TransferServer, recv_root: Path, tmp_path: Path
) -> None:
    src = make_source(tmp_path)
    async with connect(server.port) as ch:
        stats = await ch.send_dir(MID, src, "round1", compress=True)
    assert tree(recv_root / MID / "round1") == tree(src)
    assert stats.wire_bytes < stats.bytes


async def test_subdir_subset_and_single_file(
    server: TransferServer, recv_root: Path, tmp_path: Path, handler: Handler
) -> None:
    src = make_source(tmp_path)
    async with connect(server.port) as ch:
        stats = await ch.send_dir(MID, src, "final", files=["sub/core-1.img", "inventory.img"])
        assert stats.files == 2
        await ch.send_file(MID, src / "pages-1.img", "final/pages-9.img")
        listed = await ch.call("listdir", {"migration_id": MID})
    assert listed["files"] == [
        "final",
        "final/inventory.img",
        "final/pages-9.img",
        "final/sub",
        "final/sub/core-1.img",
    ]
    assert (recv_root / MID / "final/pages-9.img").read_bytes() == (
        src / "pages-1.img"
    ).read_bytes()


async def test_resending_a_file_replaces_it(
    server: TransferServer, recv_root: Path, tmp_path: Path
) -> None:
    f = tmp_path / "a.img"
    async with connect(server.port) as ch:
        f.write_bytes(b"first")
        await ch.send_file(MID, f)
        f.write_bytes(b"second version")
        await ch.send_file(MID, f)
    assert (recv_root / MID / "a.img").read_bytes() == b"second version"


@contextlib.asynccontextmanager
async def delay_proxy(target_port: int, one_way: float) -> AsyncIterator[int]:
    """A TCP relay that delivers every byte ``one_way`` seconds late: a long, fast link.

    Yields its port; on exit every relayed connection is closed and every task awaited.
    """
    writers: list[asyncio.StreamWriter] = []
    tasks: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        try:
            with contextlib.suppress(OSError):
                while data := await reader.read(1 << 20):
                    queue.put_nowait((time.monotonic() + one_way, data))
            queue.put_nowait((time.monotonic() + one_way, b""))
            with contextlib.suppress(OSError):
                await delivery
        finally:
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await delivery

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writers.extend([writer, up_writer])
        # On close, end normally: a cancelled task upsets 3.11's stream callback.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield int(proxy.sockets[0].getsockname()[1])
    finally:
        proxy.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.transport.abort()
        await proxy.wait_closed()
        await asyncio.sleep(0)


async def test_many_files_cost_one_round_trip_not_one_each(
    server: TransferServer, recv_root: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"core-{i}.img").write_bytes(os.urandom(2000))
    async with delay_proxy(server.port, one_way=0.1) as port, connect(port) as ch:
        rtt = await ch.ping()
        stats = await ch.send_dir(MID, src)
    assert rtt >= 0.2
    assert tree(recv_root / MID) == tree(src)
    # Replies are collected while sending: 40 files over a 200 ms round trip take about one.
    assert stats.seconds < 3 * rtt, stats.seconds


# --- calls ---------------------------------------------------------------------------------------


async def test_call_with_params_returns_result(server: TransferServer, handler: Handler) -> None:
    async with connect(server.port) as ch:
        result = await ch.call("echo", {"n": 3, "nested": {"x": [1, "two"]}})
        rtt = await ch.ping()
    assert result == {"params": {"n": 3, "nested": {"x": [1, "two"]}}, "peer": "gwa", "node": "gwb"}
    assert handler.calls == [("gwa", "echo", {"n": 3, "nested": {"x": [1, "two"]}})]
    assert 0 < rtt < 1


async def test_handler_errors_arrive_as_typed_remote_errors(server: TransferServer) -> None:
    async with connect(server.port) as ch:
        with pytest.raises(RemoteError) as refused:
            await ch.call("refuse", {"service": "x"})
        assert refused.value.code == "remote"
        assert refused.value.error_type == "ConfigError"
        assert "no such service" in str(refused.value)
        assert "gwb" in str(refused.value)
        assert refused.value.hint == "deploy it first"
        with pytest.raises(RemoteError) as crashed:
            await ch.call("crash")
        assert crashed.value.code == "internal"
        assert crashed.value.error_type == "RuntimeError"
        # The channel stays usable after refusals.
        assert (await ch.call("echo", {}))["peer"] == "gwa"


async def test_long_call_survives_short_idle_timeout_thanks_to_keepalives(
    server: TransferServer,
) -> None:
    async with connect(server.port, idle_timeout=0.4) as ch:
        assert await ch.call("slow", {"seconds": 1.0}) == {"slept": 1.0}


async def test_call_timeout_and_invalid_params(server: TransferServer) -> None:
    async with connect(server.port) as ch:
        with pytest.raises(TransferError, match="invalid call"):
            await ch.call("echo", {"blob": "x" * 100_000})
        with pytest.raises(TransferError, match="invalid call"):
            await ch.call("Bad Op!", {})
        assert (await ch.call("echo", {}))["node"] == "gwb"
        with pytest.raises(PeerError, match="took over"):
            await ch.call("slow", {"seconds": 5}, timeout=0.3)
        with pytest.raises(PeerError, match="unusable"):
            await ch.call("echo", {})


async def test_call_with_binary_data_in_the_reply(server: TransferServer) -> None:
    async with connect(server.port) as ch:
        result, data = await ch.call_data("pages", {"count": 5000})
        assert (result, data) == ({"count": 5000}, b"\xab" * 5000)
        assert await ch.call_data("echo", {}) == ({"params": {}, "peer": "gwa", "node": "gwb"}, b"")
        # More than one data frame can carry is refused by the handler's side, not sent.
        with pytest.raises(RemoteError) as too_big:
            await ch.call_data("pages", {"count": 2 * 1024 * 1024})
        assert too_big.value.code == "internal"
        assert (await ch.call("echo", {}))["node"] == "gwb"


async def test_a_cancelled_operation_closes_the_channel(
    server: TransferServer, tmp_path: Path
) -> None:
    async with connect(server.port) as ch:
        task = asyncio.create_task(ch.call("slow", {"seconds": 5}))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Its late reply must not be taken for the answer to the next call.
        with pytest.raises(PeerError, match="interrupted"):
            await ch.call("echo", {})


async def test_unreadable_local_file_fails_cleanly(
    server: TransferServer, recv_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_source(tmp_path)
    real_open = Path.open

    def failing_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "pages-1.img":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    async with connect(server.port) as ch:
        with pytest.raises(TransferError, match=r"cannot read .*pages-1\.img"):
            await ch.send_dir(MID, src)
        monkeypatch.undo()
        assert (await ch.call("echo", {}))["peer"] == "gwa"
        await ch.send_dir(MID, src)
    assert tree(recv_root / MID) == tree(src)
    assert partials(recv_root) == []


# --- authentication ------------------------------------------------------------------------------


async def test_client_whose_certificate_names_another_node_than_its_hello_is_refused(
    server: TransferServer, recv_root: Path, handler: Handler, caplog: pytest.LogCaptureFixture
) -> None:
    # Node gwc holds a valid certificate of the site CA, but speaks as gwa.
    reader, writer = await raw_tls(server.port, SEC["gwc"].client)
    writer.write(encode_message(Hello(version=PROTOCOL_VERSION, node="gwa", peer="gwb")))
    error = await expect_error(reader)
    assert error.code == "auth"
    assert "claims to be gwa" in error.message
    assert "names gwc" in error.message
    assert error.hint
    writer.write(file_frames("x.img", b"data"))
    assert await closed_by_peer(reader)
    writer.close()
    assert handler.calls == []
    assert entries(recv_root) == []
    assert "claims to be gwa" in caplog.text


async def test_the_session_peer_is_the_certificate_identity(server: TransferServer) -> None:
    async with connect(server.port, security=SEC["gwc"]) as ch:
        assert (await ch.call("echo", {}))["peer"] == "gwc"


async def test_server_that_is_not_the_expected_node_is_refused(
    recv_root: Path, handler: Handler
) -> None:
    # A node with valid credentials answers at the address the client has for gwb.
    async with TransferServer(
        host="127.0.0.1", port=0, security=SEC["gwc"], root=recv_root, handler=handler
    ) as other:
        with pytest.raises(
            AuthError, match="fogmig:node:gwc, not the expected fogmig:node:gwb"
        ) as e:
            async with connect(other.port):
                pass
        assert "gwb" in str(e.value.hint)
    assert handler.calls == []


async def test_client_certificate_from_another_ca_is_refused(
    server: TransferServer, recv_root: Path, handler: Handler, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(AuthError, match="refused this node's certificate") as refused:
        async with connect(server.port, security=SEC["forged-gwa"]):
            pass
    assert str(FILES["forged-gwa"].cert) in str(refused.value)
    assert str(FILES["forged-gwa"].ca) in str(refused.value.hint)
    await wait_until(lambda: "refused the TLS handshake" in caplog.text, 5)
    assert str(FILES["gwb"].ca) in caplog.text  # the server says which CA it trusts
    assert handler.calls == []
    assert entries(recv_root) == []


async def test_server_certificate_from_another_ca_is_refused(
    recv_root: Path, handler: Handler
) -> None:
    async with TransferServer(
        host="127.0.0.1", port=0, security=SEC["rogue-gwb"], root=recv_root, handler=handler
    ) as rogue:
        with pytest.raises(AuthError, match=r"TLS handshake failed.*not of the site CA") as e:
            async with connect(rogue.port):
                pass
        assert str(FILES["gwa"].ca) in str(e.value)
    assert handler.calls == []


async def test_clients_without_a_node_certificate_are_refused(
    server: TransferServer, recv_root: Path, handler: Handler, caplog: pytest.LogCaptureFixture
) -> None:
    # No TLS at all: a plaintext HELLO is not a TLS handshake.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(encode_message(Hello(version=PROTOCOL_VERSION, node="gwa", peer="gwb")))
    assert await closed_by_peer(reader)
    writer.close()
    # TLS without a client certificate.
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cafile=str(FILES["gwb"].ca))
    reader, writer = await raw_tls(server.port, bare)
    writer.write(encode_message(Hello(version=PROTOCOL_VERSION, node="gwa", peer="gwb")))
    assert await closed_by_peer(reader)
    writer.close()
    # A certificate of the site CA, but for a device, not a node.
    reader, writer = await raw_tls(server.port, client_context(FILES["device"]))
    writer.write(encode_message(Hello(version=PROTOCOL_VERSION, node="gwa", peer="gwb")))
    assert await closed_by_peer(reader)
    writer.close()
    await wait_until(lambda: "fogmig:device:d1, not a node" in caplog.text, 5)
    assert handler.calls == []
    assert entries(recv_root) == []


async def test_node_names_are_bound(server: TransferServer) -> None:
    # The client checks the server's certificate before it says anything.
    with pytest.raises(AuthError, match="not the expected fogmig:node:gwc"):
        async with connect(server.port, peer="gwc"):
            pass
    # A client that asks for another node than the one it reached is refused by the server.
    reader, writer = await raw_tls(server.port)
    writer.write(encode_message(Hello(version=PROTOCOL_VERSION, node="gwa", peer="gwc")))
    error = await expect_error(reader)
    assert error.code == "auth"
    assert "wants node gwc" in error.message
    assert await closed_by_peer(reader)
    writer.close()


def test_many_concurrent_sessions_on_uvloop(recv_root: Path, handler: Handler) -> None:
    # The agents run on uvloop, whose transports read as soon as a connection is made: no
    # byte of a client's TLS handshake may be taken by anything but TLS.
    import uvloop

    async def one(port: int, i: int) -> str:
        async with connect(port, security=SEC["gwa" if i % 2 else "gwc"]) as ch:
            return str((await ch.call("echo", {"i": i}))["peer"])

    async def main() -> list[str]:
        async with TransferServer(
            host="127.0.0.1", port=0, security=SEC["gwb"], root=recv_root, handler=handler
        ) as srv:
            return await asyncio.gather(*(one(srv.port, i) for i in range(40)))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        peers = runner.run(main())
    assert peers == ["gwa" if i % 2 else "gwc" for i in range(40)]


async def test_bad_names_and_identities_are_config_errors(
    server: TransferServer, recv_root: Path, handler: Handler
) -> None:
    with pytest.raises(ConfigError):
        async with connect(server.port, peer="../gwb"):
            pass
    with pytest.raises(ConfigError):
        ChannelSecurity.plaintext_for_benchmarks("GW B")
    with pytest.raises(ConfigError, match="needs a node's certificate"):
        ChannelSecurity.from_files(FILES["device"])
    missing = identity_files(recv_root, Identity.node("gwz"))
    with pytest.raises(FogmigError, match="missing"):
        TransferServer(host="127.0.0.1", port=0, security=missing, root=recv_root, handler=handler)


async def test_identity_files_can_be_given_directly(
    recv_root: Path, handler: Handler, tmp_path: Path
) -> None:
    src = make_source(tmp_path)
    async with (
        TransferServer(
            host="127.0.0.1", port=0, security=FILES["gwb"], root=recv_root, handler=handler
        ) as srv,
        TransferClient.connect("127.0.0.1", srv.port, security=FILES["gwa"], peer="gwb") as ch,
    ):
        await ch.send_dir(MID, src)
    assert tree(recv_root / MID) == tree(src)


async def test_plaintext_for_benchmarks_only_talks_to_plaintext(
    recv_root: Path, handler: Handler, server: TransferServer, tmp_path: Path
) -> None:
    src = make_source(tmp_path)
    plain_b = ChannelSecurity.plaintext_for_benchmarks("gwb")
    plain_a = ChannelSecurity.plaintext_for_benchmarks("gwa")
    assert plain_a.plaintext
    assert not SEC["gwa"].plaintext
    async with TransferServer(
        host="127.0.0.1", port=0, security=plain_b, root=recv_root, handler=handler
    ) as srv:
        async with TransferClient.connect(
            "127.0.0.1", srv.port, security=plain_a, peer="gwb"
        ) as ch:
            await ch.send_dir(MID, src)
        # A TLS client never falls back to plaintext.
        with pytest.raises(AuthError):
            async with connect(srv.port):
                pass
    assert tree(recv_root / MID) == tree(src)
    # Nor does a TLS server accept a plaintext client.
    with pytest.raises(PeerError):
        async with TransferClient.connect(
            "127.0.0.1", server.port, security=plain_a, peer="gwb", timeout=2.0
        ):
            pass


# --- tampering on the link -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def altering_proxy(
    target_port: int, alter: Callable[[int, bytes], bytes]
) -> AsyncIterator[int]:
    """A TCP relay that passes what the client sends through ``alter(offset, chunk)``.

    The server's replies pass unchanged. Yields its port; on exit everything is closed.
    """
    writers: list[asyncio.StreamWriter] = []
    tasks: set[asyncio.Task[None]] = set()

    async def pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, change: bool
    ) -> None:
        offset = 0
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                out = alter(offset, data) if change else data
                offset += len(data)
                writer.write(out)
                await writer.drain()
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writers.extend([writer, up_writer])
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield int(proxy.sockets[0].getsockname()[1])
    finally:
        proxy.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.transport.abort()
        await proxy.wait_closed()
        await asyncio.sleep(0)


def flip_byte_at(position: int) -> Callable[[int, bytes], bytes]:
    def alter(offset: int, data: bytes) -> bytes:
        if offset <= position < offset + len(data):
            i = position - offset
            return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        return data

    return alter


def inject_at(position: int, extra: bytes) -> Callable[[int, bytes], bytes]:
    def alter(offset: int, data: bytes) -> bytes:
        if offset <= position < offset + len(data):
            i = position - offset
            return data[:i] + extra + data[i:]
        return data

    return alter


@pytest.mark.parametrize(
    "alter",
    [
        flip_byte_at(2 * CHUNK_SIZE),
        # A forged abort of file 0 in the channel's own framing, between two TLS records or
        # inside one: either way it is not a valid TLS record.
        inject_at(2 * CHUNK_SIZE, encode_message(FileAbort(seq=0, reason="forged"))),
    ],
    ids=["flipped-byte", "injected-frame"],
)
async def test_data_altered_on_the_link_is_detected_and_nothing_is_stored(
    server: TransferServer,
    recv_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    alter: Callable[[int, bytes], bytes],
) -> None:
    big = tmp_path / "pages-1.img"
    big.write_bytes(os.urandom(6 * CHUNK_SIZE))
    async with altering_proxy(server.port, alter) as port, connect(port, idle_timeout=2.0) as ch:
        with pytest.raises(PeerError):
            await ch.send_file(MID, big)
    await wait_until(lambda: "TLS" in caplog.text and "nothing of it was used" in caplog.text, 5)
    assert not (recv_root / MID / "pages-1.img").exists()
    await wait_until(lambda: not partials(recv_root), 5)


async def test_a_tls_failure_mid_session_is_a_typed_tls_error() -> None:
    from fogmig.platform.transfer.connection import tls_failure

    mac = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed")
    mac.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    error = tls_failure("node gwb: peer gwa", mac)
    assert isinstance(error, TlsError)
    assert isinstance(error, PeerError)
    assert "bad record MAC" in str(error)
    assert error.hint
    eof = tls_failure("node gwb: peer gwa", ssl.SSLEOFError(8, "EOF"))
    assert not isinstance(eof, TlsError)


# --- integrity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sha", "match"),
    [
        (None, "0" * 64, "SHA-256 mismatch"),
        (2000, None, "declared 2000"),
        (10, None, "more than the declared"),
    ],
)
async def test_corrupted_files_are_rejected_and_removed(
    server: TransferServer, recv_root: Path, size: int | None, sha: str | None, match: str
) -> None:
    reader, writer = await raw_session(server.port)
    writer.write(file_frames("pages-1.img", b"x" * 1000, sha=sha, size=size))
    error = await expect_error(reader)
    assert error.code == "integrity"
    assert error.seq == 0
    assert match in error.message
    assert "pages-1.img" in error.message
    # The session goes on: a good file after a bad one is stored.
    writer.write(file_frames("ok.img", b"fine", seq=1))
    assert decode_message(await read_frame(reader), FileOk).seq == 1
    writer.close()
    assert tree(recv_root / MID) == {"ok.img": b"fine"}
    assert partials(recv_root) == []


async def test_integrity_error_reaches_the_client(
    server: TransferServer, recv_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "core.img"
    f.write_bytes(os.urandom(100_000))
    # Flip a byte after hashing, as a faulty link or disk would.
    original = ChunkSource.next_payload

    def corrupting(self: Any) -> bytes:
        data = original(self)
        return bytes([data[0] ^ 1]) + data[1:] if data else data

    monkeypatch.setattr(ChunkSource, "next_payload", corrupting)
    async with connect(server.port) as ch:
        with pytest.raises(IntegrityError, match=r"core\.img"):
            await ch.send_file(MID, f)
        monkeypatch.undo()
        await ch.send_file(MID, f, "again.img")
    assert tree(recv_root / MID) == {"again.img": f.read_bytes()}


async def test_corrupt_compressed_stream_is_rejected(
    server: TransferServer, recv_root: Path
) -> None:
    reader, writer = await raw_session(server.port)
    data = b"abc" * 10_000
    packed = bytearray(ChunkEncoder().encode(data))
    assert packed[0] == TAG_ZSTD
    packed[len(packed) // 2] ^= 0xFF
    begin = FileBegin(seq=0, migration_id=MID, path="z.img", size=len(data), compression="zstd")
    writer.write(encode_message(begin) + encode_frame(FrameType.FILE_DATA, bytes(packed)))
    writer.write(encode_message(FileEnd(seq=0, sha256=hashlib.sha256(data).hexdigest())))
    assert (await expect_error(reader)).code == "integrity"
    # A bomb: a few bytes that declare far more than the file's size are refused unread.
    bomb = bytes((TAG_ZSTD,)) + zstandard.ZstdCompressor(level=19).compress(bytes(200_000))
    begin = FileBegin(seq=1, migration_id=MID, path="b.img", size=100, compression="zstd")
    writer.write(encode_message(begin) + encode_frame(FrameType.FILE_DATA, bomb))
    writer.write(encode_message(FileEnd(seq=1, sha256="0" * 64)))
    error = await expect_error(reader)
    assert (error.code, error.seq) == ("integrity", 1)
    writer.close()
    assert tree(recv_root) == {}


# --- confinement ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "a/.", "a\x00b", "a\\..\\b", "x/"]
)
async def test_path_traversal_is_rejected(
    server: TransferServer, recv_root: Path, tmp_path: Path, path: str
) -> None:
    reader, writer = await raw_session(server.port)
    writer.write(file_frames(path, b"evil"))
    error = await expect_error(reader)
    assert error.code == "path"
    writer.write(file_frames("ok.img", b"ok", seq=1))
    assert (await read_frame(reader)).type is FrameType.FILE_OK
    writer.close()
    assert tree(tmp_path) == {"recv/fmtx-m1/ok.img": b"ok"}


async def test_symlinks_are_never_followed(
    server: TransferServer, recv_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    mdir = recv_root / MID
    mdir.mkdir()
    (mdir / "dirlink").symlink_to(outside)
    (mdir / "filelink").symlink_to(outside / "victim")
    reader, writer = await raw_session(server.port)
    writer.write(file_frames("dirlink/victim", b"evil"))
    assert (await expect_error(reader)).code == "path"
    # Sending over a symlink replaces the link itself, never the file it points to.
    writer.write(file_frames("filelink", b"replaced", seq=1))
    assert (await read_frame(reader)).type is FrameType.FILE_OK
    writer.close()
    assert (outside / "victim").read_bytes() == b"precious"
    assert not (mdir / "filelink").is_symlink()
    assert (mdir / "filelink").read_bytes() == b"replaced"


async def test_migration_dir_that_is_a_symlink_is_refused(
    server: TransferServer, recv_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (recv_root / MID).symlink_to(outside)
    reader, writer = await raw_session(server.port)
    writer.write(file_frames("a.img", b"evil"))
    assert (await expect_error(reader)).code == "path"
    writer.close()
    assert entries(outside) == []


async def test_invalid_migration_id_closes_the_connection(
    server: TransferServer, recv_root: Path
) -> None:
    reader, writer = await raw_session(server.port)
    begin = b'{"seq":0,"migration_id":"../up","path":"a","size":1}'
    writer.write(encode_frame(FrameType.FILE_BEGIN, begin))
    assert (await expect_error(reader)).code == "protocol"
    assert await closed_by_peer(reader)
    writer.close()
    assert entries(recv_root) == []


async def test_client_refuses_bad_paths_and_symlinks_locally(
    server: TransferServer, tmp_path: Path
) -> None:
    src = make_source(tmp_path)
    (src / "link").symlink_to(src / "inventory.img")
    async with connect(server.port) as ch:
        with pytest.raises(PathError):
            await ch.send_file(MID, src / "inventory.img", "../x")
        with pytest.raises(PathError):
            await ch.send_dir("../m", src)
        with pytest.raises(PathError, match="not a regular file"):
            await ch.send_dir(MID, src)
        with pytest.raises(PathError):
            await ch.send_dir(MID, src, files=["sub/../../etc/passwd"])


# --- malformed frames ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        HEADER.pack(2**31, FrameType.FILE_DATA),
        HEADER.pack(1 + 70_000, FrameType.CALL) + b"{" * 70_000,
        HEADER.pack(1, 99),
        HEADER.pack(0, FrameType.CALL),
        encode_frame(FrameType.CALL, b"not json"),
        encode_frame(FrameType.CALL, b'{"id": 1, "op": "echo", "evil": 1}'),
        encode_frame(FrameType.FILE_DATA, b"data outside a file"),
        encode_frame(FrameType.FILE_END, b'{"seq": 0, "sha256": "' + b"0" * 64 + b'"}'),
        encode_frame(FrameType.RESULT, b'{"id": 0}'),
    ],
)
async def test_malformed_frames_close_the_connection(
    server: TransferServer, recv_root: Path, raw: bytes
) -> None:
    reader, writer = await raw_session(server.port)
    writer.write(raw)
    error = await expect_error(reader)
    assert error.code == "protocol"
    assert await closed_by_peer(reader)
    writer.close()
    assert entries(recv_root) == []


async def test_oversized_frames_are_refused_before_reading_them() -> None:
    with pytest.raises(ProtocolError):
        decode_header(HEADER.pack(2**31, FrameType.FILE_DATA))
    with pytest.raises(ProtocolError):
        encode_header(FrameType.CALL, 1 << 20)


# --- dead peers and cut links --------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_sender_dying_mid_stream_leaves_no_partial_file(
    server: TransferServer, recv_root: Path
) -> None:
    _, writer = await raw_session(server.port)
    begin = FileBegin(seq=0, migration_id=MID, path="pages-1.img", size=10 * CHUNK_SIZE)
    writer.write(encode_message(begin) + encode_frame(FrameType.FILE_DATA, b"x" * CHUNK_SIZE))
    await writer.drain()
    await wait_until(lambda: bool(partials(recv_root)), 5)
    writer.transport.abort()
    await wait_until(lambda: not partials(recv_root), 5)
    assert tree(recv_root) == {}


async def test_silent_sender_times_out_and_partial_is_removed(
    recv_root: Path, handler: Handler
) -> None:
    async with TransferServer(
        host="127.0.0.1",
        port=0,
        security=SEC["gwb"],
        root=recv_root,
        handler=handler,
        idle_timeout=0.5,
    ) as srv:
        reader, writer = await raw_session(srv.port)
        begin = FileBegin(seq=0, migration_id=MID, path="pages-1.img", size=10 * CHUNK_SIZE)
        writer.write(encode_message(begin) + encode_frame(FrameType.FILE_DATA, b"x" * 1000))
        await wait_until(lambda: bool(partials(recv_root)), 5)
        # The link is cut: nothing more arrives, nothing is closed.
        waited = await wait_until(lambda: not partials(recv_root), 5)
        assert waited < 2
        assert await closed_by_peer(reader)
        writer.close()


async def fake_peer(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> asyncio.Server:
    """A server that authenticates like a real one, then does what ``behaviour`` says."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decode_message(await read_frame(reader), Hello)
        writer.write(encode_message(Welcome(node="gwb")))
        try:
            await behaviour(reader, writer)
        finally:
            writer.transport.abort()

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=SEC["gwb"].server)


async def test_receiver_dying_mid_stream_fails_the_sender(tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(8 * 1024 * 1024))

    async def die_after_some_data(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(CHUNK_SIZE)
        writer.transport.abort()

    peer = await fake_peer(die_after_some_data)
    port = peer.sockets[0].getsockname()[1]
    try:
        start = time.monotonic()
        async with connect(port, idle_timeout=1.0) as ch:
            with pytest.raises(PeerError, match="gwb"):
                await ch.send_file(MID, big)
            with pytest.raises(PeerError, match="unusable"):
                await ch.call("echo")
        assert time.monotonic() - start < 3
    finally:
        peer.close()
        await peer.wait_closed()


async def test_cut_link_fails_the_sender_within_the_idle_timeout(tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(32 * 1024 * 1024))
    stop = asyncio.Event()

    async def stop_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Accept nothing more and say nothing: a cut link looks like this to the sender.
        writer.transport.pause_reading()
        await stop.wait()
        writer.transport.abort()

    peer = await fake_peer(stop_reading)
    port = peer.sockets[0].getsockname()[1]
    try:
        start = time.monotonic()
        async with connect(port, idle_timeout=0.5) as ch:
            with pytest.raises(PeerError, match=r"took nothing|no reply|nothing received"):
                await ch.send_file(MID, big)
        assert time.monotonic() - start < 3
    finally:
        stop.set()
        await asyncio.sleep(0.05)
        peer.close()
        await peer.wait_closed()


async def test_silent_peer_during_a_call_times_out(tmp_path: Path) -> None:
    stop = asyncio.Event()

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()

    peer = await fake_peer(say_nothing)
    port = peer.sockets[0].getsockname()[1]
    try:
        start = time.monotonic()
        async with connect(port, idle_timeout=0.4) as ch:
            with pytest.raises(PeerError, match="nothing received"):
                await ch.call("echo")
        assert time.monotonic() - start < 2
    finally:
        stop.set()
        await asyncio.sleep(0.05)
        peer.close()
        await peer.wait_closed()


async def test_connect_to_nothing_is_a_peer_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(PeerError, match="cannot connect"):
        async with connect(port):
            pass


# --- disk full -----------------------------------------------------------------------------------


def filling_writer(limit: int) -> Callable[[int, memoryview], int]:
    """os.write that fails with ENOSPC once ``limit`` bytes were written in total."""
    written = 0

    def write(fd: int, data: memoryview) -> int:
        nonlocal written
        if written + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written += len(data)
        return os.write(fd, data)

    return write


async def test_disk_full_is_reported_and_partial_removed(
    recv_root: Path, handler: Handler, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-small.img").write_bytes(b"a" * 1000)
    (src / "b-big.img").write_bytes(os.urandom(4 * CHUNK_SIZE))
    (src / "c-after.img").write_bytes(b"c" * 1000)
    async with (
        TransferServer(
            host="127.0.0.1",
            port=0,
            security=SEC["gwb"],
            root=recv_root,
            handler=handler,
            file_writer=filling_writer(CHUNK_SIZE),
        ) as srv,
        connect(srv.port) as ch,
    ):
        with pytest.raises(NoSpaceError, match=r"b-big\.img") as full:
            await ch.send_dir(MID, src)
        assert "gwb" in str(full.value)
        assert full.value.hint
        # The channel is still usable; the refused file is not there (files sent before the
        # refusal came back may be).
        files = (await ch.call("listdir", {"migration_id": MID}))["files"]
        assert "a-small.img" in files
        assert "b-big.img" not in files
    assert partials(recv_root) == []


async def test_a_bug_in_one_session_spares_the_server(
    recv_root: Path, handler: Handler, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_writer(fd: int, data: memoryview) -> int:
        raise RuntimeError("bug in the write path")

    src = make_source(tmp_path)
    async with TransferServer(
        host="127.0.0.1",
        port=0,
        security=SEC["gwb"],
        root=recv_root,
        handler=handler,
        file_writer=broken_writer,
    ) as srv:
        async with connect(srv.port) as ch:
            with pytest.raises(PeerError):
                await ch.send_dir(MID, src)
        assert "session failed" in caplog.text
        async with connect(srv.port) as ch:
            assert (await ch.call("echo", {}))["node"] == "gwb"
    assert partials(recv_root) == []


# --- housekeeping --------------------------------------------------------------------------------


async def test_remove_migration_dir_stays_inside(tmp_path: Path, recv_root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    mdir = recv_root / MID
    (mdir / "a" / "b").mkdir(parents=True)
    (mdir / "a" / "b" / "f.img").write_text("x")
    (mdir / "link").symlink_to(outside)
    assert remove_migration_dir(recv_root, MID) is True
    assert not mdir.exists()
    assert (outside / "keep").read_text() == "keep"
    assert remove_migration_dir(recv_root, MID) is False
    with pytest.raises(PathError):
        remove_migration_dir(recv_root, "../outside")


async def test_server_stop_ends_sessions_and_cleans_up(recv_root: Path, handler: Handler) -> None:
    async with TransferServer(
        host="127.0.0.1", port=0, security=SEC["gwb"], root=recv_root, handler=handler
    ) as srv:
        reader, writer = await raw_session(srv.port)
        begin = FileBegin(seq=0, migration_id=MID, path="p.img", size=10 * CHUNK_SIZE)
        writer.write(encode_message(begin) + encode_frame(FrameType.FILE_DATA, b"x" * 1000))
        await wait_until(lambda: bool(partials(recv_root)), 5)
    assert partials(recv_root) == []
    assert await closed_by_peer(reader)
    writer.close()


def test_errors_are_in_the_fogmig_tree() -> None:
    for cls in (AuthError, IntegrityError, PathError, PeerError, NoSpaceError, RemoteError):
        assert issubclass(cls, TransferError)
        assert issubclass(cls, FogmigError)
    assert issubclass(ProtocolError, PeerError)


# --- codec (pure) --------------------------------------------------------------------------------

fuzz = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

frame_types = st.sampled_from(list(FrameType))


@fuzz
@given(
    st.sampled_from(sorted(MESSAGE_OF, key=int)),
    st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["seq", "path", "size", "id", "op", "code", "sha256", "x"]),
            st.one_of(st.integers(), st.text(max_size=20), st.none(), st.booleans()),
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_messages_parse_or_raise_protocol_error(ftype: FrameType, payload: bytes) -> None:
    try:
        message = decode_message(Frame(ftype, payload), MESSAGE_OF[ftype])
    except ProtocolError:
        return
    assert FRAME_OF[type(message)] is ftype
    assert decode_message(Frame(ftype, encode_message(message)[HEADER_SIZE:]), type(message))


@fuzz
@given(
    st.text(alphabet=st.sampled_from(["a", "b", ".", "/", "\\", "\x00", "\n", "é"]), max_size=30)
)
def test_accepted_paths_stay_inside(path: str) -> None:
    try:
        parts = check_relative_path(path)
    except PathError:
        return
    resolved = posixpath.normpath(posixpath.join("/base", *parts))
    assert resolved.startswith("/base/")
    assert all(part not in ("", ".", "..") and "\x00" not in part for part in parts)


@pytest.mark.parametrize("path", ["a", "a/b/c.img", "pages-1.img", "round1/images/core-1.img", "é"])
def test_ordinary_paths_are_accepted(path: str) -> None:
    assert "/".join(check_relative_path(path)) == path


@pytest.mark.parametrize("mid", ["", ".", "..", "../x", "a/b", "-x", "a" * 129, "a\x00"])
def test_bad_migration_ids(mid: str) -> None:
    with pytest.raises(PathError):
        check_migration_id(mid)


@fuzz
@given(
    st.binary(max_size=20_000),
    st.lists(st.integers(1, 5000), max_size=20),
    st.booleans(),
    st.integers(0, 10**9),
)
def test_incoming_file_verifies_content(
    data: bytes, cuts: list[int], compress: bool, flip: int
) -> None:
    # Uncompressed data may arrive cut anywhere; tagged chunks arrive one per frame.
    if compress:
        encoder = ChunkEncoder()
        frames = [encoder.encode(data[i : i + 4096]) for i in range(0, len(data), 4096)]
    else:
        frames, pos = [], 0
        for cut in [*cuts, len(data)]:
            frames.append(data[pos : pos + cut])
            pos += cut
    digest = hashlib.sha256(data).hexdigest()

    def receive(payloads: list[bytes]) -> bytes:
        begin = FileBegin(
            seq=0,
            migration_id=MID,
            path="f",
            size=len(data),
            compression="zstd" if compress else "none",
        )
        incoming = IncomingFile(begin)
        out = b"".join(piece for p in payloads if p for piece in incoming.feed(p))
        incoming.finish(FileEnd(seq=0, sha256=digest))
        return out

    assert receive(frames) == data
    sizes = [len(f) for f in frames]
    if sum(sizes):
        at = flip % sum(sizes)
        i = 0
        while at >= sizes[i]:
            at -= sizes[i]
            i += 1
        damaged = bytearray(frames[i])
        damaged[at] ^= 1 << (flip % 8)
        altered = [*frames[:i], bytes(damaged), *frames[i + 1 :]]
        if not compress:
            with pytest.raises(IntegrityError):
                receive(altered)
            return
        # A few bits of a zstd frame header do not change the content (its window size);
        # what is accepted must be the original content, whatever the damage.
        with contextlib.suppress(IntegrityError):
            assert receive(altered) == data


def test_chunk_encoder_compresses_only_where_it_pays() -> None:
    encoder = ChunkEncoder()
    noise = os.urandom(CHUNK_SIZE)
    text = b"pagemap metadata " * (CHUNK_SIZE // 17)
    assert encoder.encode(noise)[0] == TAG_RAW
    # After incompressible chunks it waits before trying again, then finds text again.
    tags = [encoder.encode(text)[0] for _ in range(4)]
    assert tags[0] == TAG_RAW
    assert TAG_ZSTD in tags
    assert encoder.wire_bytes < encoder.plain_bytes
    decoder = ChunkDecoder(max_chunk=CHUNK_SIZE)
    assert decoder.decode(ChunkEncoder().encode(text), len(text)) == text
    with pytest.raises(ChunkCodecError):
        decoder.decode(bytes((7,)) + text, len(text))
    with pytest.raises(ChunkCodecError):
        decoder.decode(ChunkEncoder().encode(text), len(text) - 1)


@fuzz
@given(st.lists(st.tuples(frame_types, st.integers(0, 5)), max_size=30))
def test_receiver_order_only_raises_protocol_errors(steps: list[tuple[FrameType, int]]) -> None:
    order = ReceiverOrder()
    for ftype, seq in steps:
        try:
            if ftype is FrameType.FILE_BEGIN:
                order.begin(seq)
            elif ftype in (FrameType.FILE_END, FrameType.FILE_ABORT):
                order.check(ftype)
                order.end(seq)
            else:
                order.check(ftype)
        except ProtocolError:
            continue
        assert (order.state is ReceiverState.IDLE) == (order.seq is None)


def test_receiver_order_rules() -> None:
    order = ReceiverOrder()
    order.check(FrameType.CALL)
    with pytest.raises(ProtocolError):
        order.check(FrameType.FILE_DATA)
    order.begin(0)
    with pytest.raises(ProtocolError):
        order.check(FrameType.CALL)
    with pytest.raises(ProtocolError):
        order.end(1)
    order.refuse()
    assert order.state is ReceiverState.DISCARDING
    assert order.end(0) is False
    with pytest.raises(ProtocolError, match="does not increase"):
        order.begin(0)
    order.begin(1)
    assert order.end(1) is True
