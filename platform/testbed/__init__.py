"""The embedded testbed: the whole fog on one machine (namespaces, emulated links, broker)."""
