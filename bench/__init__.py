"""Benchmarks. Each script prints one JSON object."""
