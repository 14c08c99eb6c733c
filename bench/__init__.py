"""Benchmarks that print ratios measured in one run; `python bench/run_all.py` runs the CPU ones."""
