"""Test-wide settings: JAX sees several CPU devices (for pmap / shard_map) and no GPU."""

import os

# Must be set before JAX starts; harmless for tests that never import JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
