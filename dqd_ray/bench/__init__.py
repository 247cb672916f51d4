"""Benchmarks behind ``dqd-ray bench ...``: they print a table and write JSON."""
