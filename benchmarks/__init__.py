"""Benchmarks against peer libraries; run with `make bench`."""
