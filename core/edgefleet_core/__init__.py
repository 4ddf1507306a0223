"""EdgeFleet core: the domain, free of Kubernetes, gRPC and kopf.

Resource models (mirrors of the CRDs in ``crds/``), and — as later features land — the optimization
pipeline, partition planner, bundle format, signing and artifact stores. Everything here is pure
or does IO only through small pluggable interfaces, so the operator and the agent can share it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
