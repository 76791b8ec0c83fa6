"""A transfer-channel client (and optionally a relaying proxy in front of it) for the system
tests, run inside a node's network namespace: ``python -P transfer_peer.py '<json>'``.

The JSON names the client's identity (certificate, key, CA; and the node it claims to be),
the node it wants and where that node is, an optional proxy (``alter``: ``none``, ``flip`` one
byte or ``inject`` bytes at an offset of what the client sends; ``capture``: write both
directions to a file) and the actions to run. It prints one JSON line: what happened.
With ``plain_server`` it first starts a plaintext server of its own (the benchmarks' mode) and
talks to that: the control that shows a capture would see data sent in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from fogmig.platform.security.identity import Identity
from fogmig.platform.security.pki import IdentityFiles
from fogmig.platform.security.tls import client_context, server_context
from fogmig.platform.transfer.client import TransferClient
from fogmig.platform.transfer.protection import ChannelSecurity
from fogmig.platform.transfer.server import TransferServer, TransferSession


class _NoCalls:
    async def on_call(
        self, session: TransferSession, op: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        return {}


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "ok": False,
        "error": type(exc).__name__,
        "kinds": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
        "hint": getattr(exc, "hint", None),
    }


class Proxy:
    """Relays TCP to ``target``, altering what the client sends as told; records both ways."""

    def __init__(self, spec: dict[str, Any], target: tuple[str, int]) -> None:
        self.spec = spec
        self.target = target
        self.capture = open(spec["capture"], "wb") if spec.get("capture") else None  # noqa: SIM115
        self.altered = False
        self.relayed = 0

    def _alter(self, offset: int, data: bytes) -> bytes:
        at = int(self.spec.get("at", 0))
        mode = self.spec.get("alter", "none")
        if mode == "none" or self.altered or not offset <= at < offset + len(data):
            return data
        self.altered = True
        i = at - offset
        if mode == "flip":
            return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1 :]
        return data[:i] + bytes.fromhex(self.spec["inject"]) + data[i:]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        offset = 0
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                out = self._alter(offset, data) if upstream else data
                offset += len(data)
                self.relayed += len(out)
                if self.capture is not None:
                    self.capture.write(out)
                writer.write(out)
                await writer.drain()
        writer.transport.abort()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                self._pump(reader, up_writer, True), self._pump(up_reader, writer, False)
            )


def _security(spec: dict[str, Any]) -> ChannelSecurity:
    if spec.get("plaintext"):
        return ChannelSecurity.plaintext_for_benchmarks(spec["claim"])
    files = IdentityFiles(
        identity=Identity.parse(spec["identity"]),
        cert=Path(spec["cert"]),
        key=Path(spec["key"]),
        ca=Path(spec["ca"]),
    )
    # Ready contexts: the node claimed in the HELLO may differ from the certificate's.
    return ChannelSecurity.from_contexts(
        node=spec["claim"], server=server_context(files), client=client_context(files)
    )


async def _act(client: TransferClient, action: dict[str, Any]) -> dict[str, Any]:
    try:
        if action["op"] == "send":
            stats = await client.send_dir(action["mid"], Path(action["src"]))
            return {"ok": True, "bytes": stats.bytes}
        result = await client.call(action["name"], action.get("params", {}), timeout=30)
        return {"ok": True, "result": result}
    except Exception as exc:
        return _error(exc)


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        if spec.get("plain_server"):
            plain = await stack.enter_async_context(
                TransferServer(
                    host="127.0.0.1",
                    port=0,
                    security=ChannelSecurity.plaintext_for_benchmarks(spec["peer"]),
                    root=Path(spec["plain_server"]),
                    handler=_NoCalls(),
                )
            )
            spec["target"] = ["127.0.0.1", plain.port]
        return await _run(spec)


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["target"]
    out: dict[str, Any] = {"results": []}
    proxy: Proxy | None = None
    server: asyncio.Server | None = None
    if spec.get("proxy") is not None:
        proxy = Proxy(spec["proxy"], (host, port))
        server = await asyncio.start_server(proxy.relay, spec["proxy"]["listen"], 0)
        host, port = spec["proxy"]["listen"], server.sockets[0].getsockname()[1]
    try:
        async with TransferClient.connect(
            host, port, security=_security(spec), peer=spec["peer"], timeout=10, idle_timeout=5
        ) as client:
            out["connected"] = True
            for action in spec.get("actions", []):
                out["results"].append(await _act(client, action))
    except Exception as exc:
        out["connected"] = out.get("connected", False)
        out["error"] = _error(exc)
    finally:
        if server is not None:
            server.close()
        if proxy is not None:
            out["relayed"] = proxy.relayed
            out["altered"] = proxy.altered
            if proxy.capture is not None:
                proxy.capture.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
