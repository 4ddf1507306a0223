"""Benchmarks of the operator package's components (``edgefleet bench gateway``)."""
