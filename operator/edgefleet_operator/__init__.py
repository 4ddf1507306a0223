"""EdgeFleet's control plane: the kopf operator, the rollout controller, the fleet gateway.

Imports the core and the wire contract; never the agent (an import-linter contract says so).
"""
