"""The monitor service: cluster-wide pipeline discovery, stats and health, read from the registry."""
