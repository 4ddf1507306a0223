"""The agent's benchmarks, registered as ``edgefleet bench …`` through the ``edgefleet.bench`` entry point."""
