"""Technique choice and placement: pure functions over measured conditions, no I/O."""
