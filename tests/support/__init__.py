"""Shared test infrastructure: real-service fixtures and a TCP fault proxy."""
