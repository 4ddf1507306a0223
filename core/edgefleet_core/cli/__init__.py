"""The ``edgefleet`` command line: a thin edge over the core's functions.

The root app lives here and finds the operator's and the agent's command groups through the
``edgefleet.cli`` entry-point group, so the core never imports them and an agent-only install still
has a working ``edgefleet`` command.
"""
