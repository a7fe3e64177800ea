"""Clients of azfs's own services, for the CLI, the node tooling and scripts alike."""
