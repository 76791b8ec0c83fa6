"""Pre-copy without soft-dirty tracking: what changed between two dumps, and rebuilding."""
