"""Running the platform's coroutines: one event loop per command, on uvloop.

Every entry point (the CLI's subcommands, the benchmark servers, the apps) starts its asyncio
work through :func:`run_async`, so they all run on the same kind of loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvloop

T = TypeVar("T")


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function on uvloop (the fastest loop for our many small sockets)."""

    async def wrapper() -> T:
        return await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(wrapper())
