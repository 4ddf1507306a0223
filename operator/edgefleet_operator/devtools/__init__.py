"""Development and test tools shipped with the operator (like kopf's testing tools).

Nothing in the operator's runtime imports them: they serve tests, ``edgefleet bench operator`` and
anyone who wants to run the operator without a cluster. They may need the development
dependencies (see ``kube_api``).
"""
