"""The embedded control plane: ``edgefleet up -f DIR`` runs the operator's reconcilers without a cluster.

- :mod:`.manifests`: reading and validating the resource files (like ``kubectl apply -f``);
- :mod:`.api`: the embedded API, one JSON file per object with generation, status and finalizers;
- :mod:`.state`: the state folder (keys, artifact store, cache, objects) and its lock;
- :mod:`.loop`: :class:`~.loop.ControlPlane`, applying the files and reconciling until settled;
- :mod:`.cli`: the ``edgefleet up`` command.

Nothing here is imported by ``edgefleet_operator`` itself: the command imports it when it runs.
"""
