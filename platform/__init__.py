"""The platform: container runtime (runc + CRIU), migration engine, agents, controller, testbed, CLI."""
