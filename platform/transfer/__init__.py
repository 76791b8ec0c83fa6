"""The agent-to-agent channel: wire format, authenticated connection, server and client."""
