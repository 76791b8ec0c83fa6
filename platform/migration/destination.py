"""The destination node's side of a migration: the operations the source agent calls.

``prepare`` creates the bundle, ``apply_delta`` rebuilds a pre-copy round, ``restore`` resumes
the service (at once, or lazily with fogmig's page server in front of CRIU's lazy-pages daemon),
``lazy_status`` reports the faulted pages, ``commit`` makes this node the owner, ``abort``
removes every trace. Until ``commit`` a fence timer runs: when the source falls silent for
``fence_timeout_s`` the copy here is killed, so a cut link never leaves two live copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogmig.platform.base.errors import (
    ConfigError,
    ContainerNotFoundError,
    FogmigError,
    MigrationError,
)
from fogmig.platform.base.nodes import check_service_name, netns_name
from fogmig.platform.migration.delta import pagedelta
from fogmig.platform.migration.lazy import pages as lazypages
from fogmig.platform.runtime.bundle import make_bundle
from fogmig.platform.runtime.container import NodeRuntime
from fogmig.platform.runtime.workdir import remove_tree

log = logging.getLogger(__name__)

Fetch = Callable[[int, int, int], Awaitable[bytes]]
FetchFactory = Callable[[str, str], Awaitable[tuple[Fetch, Fetch, Callable[[], Awaitable[None]]]]]
"""(source node, migration id) -> (fetch on fault, fetch ahead, close): two channels back to
the source, so that faults never queue behind the prefetch."""


@dataclass(slots=True)
class Incoming:
    """One migration arriving at this node."""

    migration_id: str
    service: str
    technique: str
    source: str
    directory: Path
    bundle: Path
    started_container: bool = False
    lazy: lazypages.LazyPagesDaemon | None = None
    page_server: lazypages.LazyPageServer | None = None
    prefetch: lazypages.PrefetchedPages | None = None
    close_fetch: Callable[[], Awaitable[None]] | None = None
    lazy_task: asyncio.Task[dict[str, Any]] | None = None
    restored_at: float = 0.0
    fence: asyncio.TimerHandle | None = None
    committed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Destination:
    """Handles the destination operations for every migration arriving at ``node``."""

    def __init__(
        self,
        *,
        node: str,
        runtime: NodeRuntime,
        rootfs: Callable[[], Path],
        bundles: Path,
        fetch_factory: FetchFactory,
        fence_timeout_s: float = 20.0,
        stale_timeout_s: float = 900.0,
        on_owned: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.node = node
        self.runtime = runtime
        self._rootfs = rootfs
        self._bundles = bundles
        self._fetch_factory = fetch_factory
        self.fence_timeout_s = fence_timeout_s
        self.stale_timeout_s = stale_timeout_s
        self._on_owned = on_owned
        self.incoming: dict[str, Incoming] = {}

    # ------------------------------------------------------------------ dispatch

    async def handle(
        self, op: str, params: dict[str, Any], directory: Path, peer: str
    ) -> dict[str, Any]:
        mid = str(params.get("migration_id", ""))
        if op == "prepare":
            return await self.prepare(mid, params, directory, peer)
        mig = self.incoming.get(mid)
        if mig is None:
            raise MigrationError(
                f"node {self.node} has no migration {mid} in progress",
                phase=op,
                migration_id=mid,
            )
        if mig.source != peer:
            raise MigrationError(
                f"migration {mid} belongs to {mig.source}, not {peer}", phase=op, migration_id=mid
            )
        self._rearm_fence(mig)
        if op == "apply_delta":
            return await self.apply_delta(mig, params)
        if op == "restore":
            return await self.restore(mig, params)
        if op == "lazy_status":
            return await self.lazy_status(mig)
        if op == "commit":
            return await self.commit(mig)
        if op == "abort":
            await self.abort(mig, "aborted by the source")
            return {"aborted": True}
        if op == "keepalive":
            return {}
        raise MigrationError(f"unknown operation {op!r}", phase=op, migration_id=mid)

    # ------------------------------------------------------------------ operations

    async def prepare(
        self, mid: str, params: dict[str, Any], directory: Path, peer: str
    ) -> dict[str, Any]:
        spec = params.get("spec")
        if not isinstance(spec, dict):
            raise ConfigError("prepare needs a service spec")
        service = check_service_name(str(spec.get("service", "")))
        args = spec.get("args")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError("prepare needs the service's process arguments")
        if mid in self.incoming:
            raise MigrationError("already prepared", phase="prepare", migration_id=mid)
        if any(m.service == service for m in self.incoming.values()):
            raise MigrationError(
                f"{service} is already migrating to {self.node}", phase="prepare", migration_id=mid
            )
        with contextlib.suppress(ContainerNotFoundError):
            state = await self.runtime.state(service)
            if state.running:
                # Two copies on one node would silently share the CoAP port (SO_REUSEPORT).
                raise MigrationError(
                    f"{service} already runs on {self.node}", phase="prepare", migration_id=mid
                )
            await self.runtime.delete(service, force=True)
        bundle = make_bundle(
            self._bundles / service,
            rootfs=self._rootfs(),
            args=args,
            netns_path=Path("/var/run/netns") / netns_name(self.node),
            restore_conf=True,
            cgroups_path=f"/fogmig/{self.node}/{service}",
            hostname=service,
        )
        directory.mkdir(parents=True, exist_ok=True)
        mig = Incoming(
            migration_id=mid,
            service=service,
            technique=str(params.get("technique", "")),
            source=peer,
            directory=directory,
            bundle=bundle,
        )
        self.incoming[mid] = mig
        self._rearm_fence(mig)
        log.info("migration %s: %s arriving from %s", mid, service, peer)
        return {"node": self.node}

    async def apply_delta(self, mig: Incoming, params: dict[str, Any]) -> dict[str, Any]:
        base = self._sub(mig, params.get("base"))
        delta = self._sub(mig, params.get("delta"))
        out = self._sub(mig, params.get("out"))
        stats = await asyncio.to_thread(pagedelta.apply_delta, base, delta, out)
        await asyncio.to_thread(shutil.rmtree, delta)
        if base != out:
            await asyncio.to_thread(shutil.rmtree, base)
        return {"seconds": stats.seconds} if hasattr(stats, "seconds") else {}

    async def restore(self, mig: Incoming, params: dict[str, Any]) -> dict[str, Any]:
        images = self._sub(mig, params.get("images"))
        work = mig.directory / "restore-work"
        mode = params.get("mode")
        mig.started_container = True
        self._rearm_fence(mig)
        started = time.monotonic()
        if mode == "full":
            result = await self.runtime.restore(
                mig.service, bundle=mig.bundle, image_dir=images, work_dir=work
            )
            mig.restored_at = time.monotonic()
            return {"seconds": mig.restored_at - started, "pid": result.pid}
        if mode != "lazy":
            raise ConfigError(f"unknown restore mode {mode!r}")
        demand, ahead, close = await self._fetch_factory(mig.source, mig.migration_id)
        mig.close_fetch = close
        remote = lazypages.RemotePages(demand)
        base_name = params.get("base")
        source: lazypages.PageSource
        if base_name:
            # Hybrid: unchanged pages from the last pre-copy round here, changed ones remote.
            base = self._sub(mig, base_name)
            changed_file = images / str(params.get("changed", ""))
            changed = {
                int(pid): vaddrs for pid, vaddrs in json.loads(changed_file.read_text()).items()
            }
            mig.prefetch = lazypages.PrefetchedPages(remote, ahead, changed)
            source = lazypages.LayeredPages(lazypages.LocalImagePages(base), mig.prefetch, changed)
        else:
            mig.prefetch = lazypages.PrefetchedPages(remote, ahead, lazypages.lazy_vaddrs(images))
            source = mig.prefetch
        # No listening socket: CRIU's daemon gets a connected socket pair, so nothing else on
        # the node can read the service's memory.
        mig.page_server = lazypages.LazyPageServer(host=None, source=source)
        await mig.page_server.start()
        mig.lazy = lazypages.LazyPagesDaemon(
            image_dir=images, work_dir=work, channel=await mig.page_server.channel()
        )
        await mig.lazy.start()
        mig.prefetch.start()
        restored = await self.runtime.restore(
            mig.service, bundle=mig.bundle, image_dir=images, work_dir=work, lazy_pages=True
        )
        mig.restored_at = time.monotonic()
        mig.lazy_task = asyncio.create_task(self._wait_pages(mig))
        return {"seconds": mig.restored_at - started, "pid": restored.pid}

    async def _wait_pages(self, mig: Incoming) -> dict[str, Any]:
        assert mig.lazy is not None
        assert mig.page_server is not None
        # Judged at the destination only: daemon exit, and every missing page accounted for.
        result = await mig.lazy.wait(None, server=mig.page_server)
        stats = mig.page_server.stats
        last = stats.last_page_at or time.monotonic()
        out: dict[str, Any] = {
            "done": True,
            "ok": result.ok,
            "remote_bytes": stats.remote_bytes,
            "remote_pages": stats.remote_pages,
            "local_pages": stats.local_pages,
            "seconds": max(0.0, last - mig.restored_at),
            "error": None if result.ok else f"{result.describe()} (log {mig.lazy.log_path})",
        }
        if not result.ok:
            # Fence: a copy with missing pages must never serve.
            await self.abort(mig, "lazy page transfer failed")
        return out

    async def lazy_status(self, mig: Incoming) -> dict[str, Any]:
        if mig.lazy_task is None:
            raise MigrationError(
                "no lazy restore", phase="lazy_status", migration_id=mig.migration_id
            )
        if not mig.lazy_task.done():
            stats = mig.page_server.stats if mig.page_server else None
            return {"done": False, "remote_bytes": stats.remote_bytes if stats else 0}
        return mig.lazy_task.result()

    async def commit(self, mig: Incoming) -> dict[str, Any]:
        """The point of no return: this node owns the service from now on."""
        mig.committed = True
        if mig.fence is not None:
            mig.fence.cancel()
        state = await self.runtime.state(mig.service)
        if not state.running:
            raise MigrationError(
                f"{mig.service} is not running here ({state.status})",
                phase="commit",
                migration_id=mig.migration_id,
            )
        await self._release(mig)
        del self.incoming[mig.migration_id]
        if self._on_owned is not None:
            await self._on_owned(mig.service)
        return {"owner": self.node}

    async def abort(self, mig: Incoming, why: str) -> None:
        """Remove every trace of ``mig``: its container if started, its files."""
        if mig.committed:
            return
        log.warning("migration %s: aborting at %s: %s", mig.migration_id, self.node, why)
        if mig.fence is not None:
            mig.fence.cancel()
        if mig.lazy is not None:
            with contextlib.suppress(FogmigError, ProcessLookupError):
                await mig.lazy.kill()
        if mig.started_container:
            with contextlib.suppress(FogmigError):
                await self.runtime.stop(mig.service, grace=0.0)
        await self._release(mig)
        with contextlib.suppress(FogmigError, OSError):
            remove_tree(mig.bundle)
        self.incoming.pop(mig.migration_id, None)

    async def close(self) -> None:
        for mig in list(self.incoming.values()):
            await self.abort(mig, "the agent is stopping")

    # ------------------------------------------------------------------ helpers

    async def _release(self, mig: Incoming) -> None:
        if mig.prefetch is not None:
            await mig.prefetch.close()
            mig.prefetch = None
        if mig.page_server is not None:
            await mig.page_server.close()
            mig.page_server = None
        if mig.close_fetch is not None:
            with contextlib.suppress(FogmigError, OSError):
                await mig.close_fetch()
            mig.close_fetch = None
        with contextlib.suppress(FogmigError, OSError):
            remove_tree(mig.directory)

    def _rearm_fence(self, mig: Incoming) -> None:
        """(Re)start the timer that drops ``mig`` when its source falls silent.

        Until a container was started here there is nothing live to fence: only files, which
        may take minutes to arrive on a slow link, so the timer is the long ``stale_timeout_s``.
        From the restore on, silence for ``fence_timeout_s`` kills the copy.
        """
        if mig.committed:
            return
        if mig.fence is not None:
            mig.fence.cancel()
        timeout = self.fence_timeout_s if mig.started_container else self.stale_timeout_s
        loop = asyncio.get_running_loop()
        mig.fence = loop.call_later(
            timeout,
            lambda: asyncio.ensure_future(
                self.abort(mig, f"no word from {mig.source} for {timeout:g} s")
            ),
        )

    @staticmethod
    def _sub(mig: Incoming, name: object) -> Path:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"invalid image directory name {name!r}")
        return mig.directory / name
