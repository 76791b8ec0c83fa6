"""Stateful migration of a running container between fog nodes: cold, pre-copy, post-copy, hybrid."""
