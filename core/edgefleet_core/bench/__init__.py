"""Benchmarks behind ``edgefleet bench``: same-run comparisons against a baseline, reported as ratios."""
