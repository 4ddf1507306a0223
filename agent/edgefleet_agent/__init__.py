"""EdgeFleet's device agent: enrollment, verified A/B updates, partitioned inference.

Imports the core and the wire contract; never the operator, Kubernetes or kopf (import-linter
contracts say so), so it stays small enough for edge devices.
"""
