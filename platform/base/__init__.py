"""The base layer: errors, paths, node names, running tools, namespaces, mounts, formatting.

It imports nothing else of fogmig, so every other package may depend on it.
"""
