"""Stateful migration of a running container between fog nodes.

Cold, pre-copy, post-copy and hybrid, over a shared phase vocabulary and metrics record.
"""
