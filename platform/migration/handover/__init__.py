"""The handover protocol: who owns a migrating service, typed messages, journal, recovery.

Sans-IO cores for both sides (``source_core``, ``destination_core``) decide; the agent executes
their actions. The ownership rule is written down in ``ownership`` and docs/handover.md.
"""
