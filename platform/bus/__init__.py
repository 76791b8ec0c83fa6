"""The MQTT bus: the versioned topic tree with a typed model per payload, and its client."""
