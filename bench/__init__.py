"""Benchmarks: each module runs with `python -m bench.NAME` from the repository root, reports
figures, and asserts nothing about them."""
