"""``edgefleet demo``: the whole chain on one machine, with real components (see :mod:`.session`)."""
