"""The ownership rule of a migrating service, and the timing that the fence proof rests on.

Exactly one node owns a service at a time, at an epoch (an integer persisted in the owner's
journal). A migration of a service owned by the source at epoch ``e`` proposes ``e + 1``.

1. The destination runs a copy only under a lease, and never after a tombstone. The lease is
   renewed by ticketed calls: every reply carries a fresh ticket, and a call with a ticket gives
   the lease ``issued + fence_timeout_s`` where ``issued`` is when the destination itself
   issued that ticket, on its own monotonic clock. A late or duplicated call therefore never
   stretches the lease beyond what the source can bound, however long the network held it. The
   lease is enforced by a fence in the runtime, armed before the restore and surviving a crash
   of the agent: when it fires the copy is killed and can never be resumed.
2. Commit is two-phase. The destination disarms the fence, persists "owner at e + 1"
   (``Committed``), and only then answers the commit. The source persists "handed over at
   e + 1" (``HandedOver``) on that answer before it deletes its copy, or "resumed at e"
   (``Resuming``) before it resumes.
3. The source resumes only on proof that the destination cannot run the service:
   a. it never sent ``restore`` (no copy can exist), or
   b. a durable answer from the destination: an ``abort`` answered ``aborted``, ``fenced`` or
      ``stale``, or any call refused with one of those tombstones (each written to the
      destination's journal before it is sent), or
   c. the fence: it never sent ``commit`` and waited ``fence_timeout_s + margin_s`` since it
      received its newest ticket (or since its own restart, which is later), so the
      destination's lease, which no ticket can extend past that instant, has run out and the
      fence (given ``margin_s`` to kill) has fired.
   Once it has sent ``commit`` only (b) or a ``committed`` answer settles the migration: it
   asks again (``commit``, then ``abort``) until the destination answers.
4. The destination's restart fences every migration it has not committed (``Tombstoned``) and
   keeps every committed one; the source's restart resumes the migration from its journal (see
   ``recovery``), so an agent that stops or crashes mid-migration loses nothing.
5. Every accepted migration ends with one ``Finished`` entry in the source's journal (completed,
   rolled back or failed, with the reason); the terminal event is published from it and
   republished after a restart until ``Published`` is written (at least once, keyed by the
   migration id).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """The protocol's timers; both agents must use the same ``fence_timeout_s``."""

    fence_timeout_s: float = 20.0
    """How long a ticket keeps the destination's copy alive after its issue."""
    margin_s: float = 2.0
    """What the source adds to the fence timeout: the fence's kill time and clock rate drift."""
    call_timeout_s: float = 10.0
    """How long the source waits for a reply before it takes the call as failed."""
    retry_s: float = 1.0
    """Pause between two attempts to settle a migration in doubt."""
    stale_timeout_s: float = 900.0
    """Silence after which a destination drops a prepared migration that never restored."""
    lazy_poll_s: float = 0.5
    """Interval of the source's lazy-status polls, which keep the destination's lease."""

    def __post_init__(self) -> None:
        if self.margin_s <= 0 or self.fence_timeout_s <= 0:
            raise ValueError("the fence timeout and margin must be positive")
        if self.lazy_poll_s + self.call_timeout_s >= self.fence_timeout_s:
            # A poll answered late must still renew the lease before it runs out.
            raise ValueError("lazy_poll_s + call_timeout_s must stay below fence_timeout_s")

    def source_resume_at(self, newest_ticket_at: float) -> float:
        """When the source may resume by rule 3c, on its own clock."""
        return newest_ticket_at + self.fence_timeout_s + self.margin_s
