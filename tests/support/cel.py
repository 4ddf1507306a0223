"""The CRDs' CEL rules evaluated as the API server would: the implementation lives with the
Kubernetes API test server in :mod:`edgefleet_operator.devtools.kube_api.cel`; tests import it from here.
"""

from edgefleet_operator.devtools.kube_api.cel import (
    CelRuleError,
    cel_problems,
    compile_all_rules,
    resource_cel_problems,
    rule_holds,
)

__all__ = ["CelRuleError", "cel_problems", "compile_all_rules", "resource_cel_problems", "rule_holds"]
