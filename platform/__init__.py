"""The platform: runtime (runc + CRIU), migration engine, agents, controller, testbed, CLI."""
