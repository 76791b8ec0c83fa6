"""The node agent: the daemon of one fog node, its configuration and its forwarding."""
