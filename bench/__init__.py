"""Benchmarks of the ingest gateway; see bench/README.md."""
