"""The testbed's lease for a whole run: one user of the machine-wide testbed at a time.

Test sessions, the demo and the experiments take it so they wait for each other rather than
collide; :func:`hold_testbed_lease` takes it without waiting first, to say why it waits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from fogmig.platform.base.errors import TestbedError
from fogmig.platform.testbed.state import exclusive_use


@contextlib.contextmanager
def hold_testbed_lease(
    timeout: float, *, take: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the testbed's lease for the block; ``take=False`` when the caller already holds it.

    When someone else has it first, ``on_wait`` hears so before the wait (up to ``timeout``).
    """
    with contextlib.ExitStack() as stack:
        if take:
            try:
                stack.enter_context(exclusive_use(timeout=0))
            except TestbedError:
                if on_wait is not None:
                    on_wait(f"the testbed is in use; waiting up to {timeout:g} s for it")
                stack.enter_context(exclusive_use(timeout=timeout))
        yield
