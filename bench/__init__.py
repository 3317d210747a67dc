"""Benchmarks that print figures: `python -m bench --help`, and bench/README.md."""
