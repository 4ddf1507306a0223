"""``python -m tests.support.kube_api --port 0 --crds crds/``: the test API server as a process.

Kept for existing callers; the same as ``python -m edgefleet_operator.devtools.kube_api``.
"""

from __future__ import annotations

from edgefleet_operator.devtools.kube_api.__main__ import main

if __name__ == "__main__":
    main(prog="python -m tests.support.kube_api")
