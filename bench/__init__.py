"""Benchmark drivers (`make bench`): nitro against reference back-ends."""
