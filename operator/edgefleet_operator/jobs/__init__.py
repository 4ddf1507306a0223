"""Class builds as Kubernetes Jobs: ``edgefleet pipeline-job`` (the Job's command) and the dispatcher.

- :mod:`.staging`: where a Job leaves its built variant and its report in the artifact store;
- :mod:`.pipeline_job`: the command a Job runs (source, pipeline, staged output; no signing keys);
- :mod:`.manifest`: the Job object for one (model, class, build key), pure;
- :mod:`.kube`: a small synchronous client for the few Job calls the dispatcher makes;
- :mod:`.dispatcher`: :class:`~.dispatcher.KubeJobDispatcher`, the reconciler's
  :class:`~edgefleet_operator.reconcile.dispatch.BuildDispatcher` over Jobs.
"""
