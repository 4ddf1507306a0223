"""``python -m edgefleet_core.cli``: the ``edgefleet`` command without relying on the console script."""

from edgefleet_core.cli.main import run

run()
